"""Export of the offline default model (radapter.models.offline.export) with the shipped adapters."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import radapter
from radapter.cli import main

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = sorted((ROOT / "adapters").glob("*.safetensors"))
IMAGES = sorted((ROOT / "tests" / "fixtures" / "emoji").rglob("*.png"))[::9][:4]
CAPTIONS = ["a t-shirt", "a photo of a dog", "x", "an emoji of a smiling face with heart-shaped eyes, drawn flat"]
REFUSAL = "no exact stock open_clip equivalent"

# Runs in `python -I` from a temporary folder: radapter cannot be imported there.
# argv: images.txt captions.json out_prefix DIR...; a DIR given as "moved:PATH" is a folder moved after
# export, loaded with the documented text_cfg override.
LOADER = r"""
import json, sys
import numpy as np, open_clip, torch
from PIL import Image
paths = open(sys.argv[1]).read().split("\n")
captions = json.load(open(sys.argv[2]))
for i, d in enumerate(sys.argv[4:]):
    kwargs = {}
    if d.startswith("moved:"):
        d = d[len("moved:"):]
        text_cfg = json.load(open(d + "/open_clip_config.json"))["model_cfg"]["text_cfg"]
        kwargs["text_cfg"] = {**text_cfg, "hf_model_name": d}
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + d, **kwargs)
    model.eval()
    tokens = open_clip.get_tokenizer("local-dir:" + d)(captions)
    images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        image = model.encode_image(images, normalize=True)
        text = model.encode_text(tokens, normalize=True)
    np.save(f"{sys.argv[3]}{i}.npy", torch.cat([image, text]).numpy())
    np.save(f"{sys.argv[3]}{i}-tokens.npy", tokens.numpy())
    np.save(f"{sys.argv[3]}{i}-scale.npy", model.logit_scale.detach().numpy())
assert "radapter" not in sys.modules
"""


@pytest.fixture(scope="module")
def default_model():
    """The default model with the first shipped adapter loaded (later files load into the same set)."""
    model, preprocess, tokenizer = radapter.load_model()
    radapter.load_adapters(model, ADAPTERS[0])
    return model, preprocess, tokenizer


def merged_features(model, preprocess, tokenizer, alpha: float) -> np.ndarray:
    images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in IMAGES])
    radapter.merge_adapters(model, alpha)
    try:
        with torch.no_grad():
            image = model.encode_image(images, normalize=True)
            text = model.encode_text(tokenizer(CAPTIONS), normalize=True)
    finally:
        radapter.unmerge_adapters(model)
    return torch.cat([image, text]).numpy()


def test_shipped_adapters_found():
    assert len(ADAPTERS) >= 3 and len(IMAGES) == 4


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda p: p.stem)
def test_bridge_head_export_is_refused_cleanly(default_model, adapter, tmp_path):
    # The shipped text head is non-linear (softmax kernel after L2 norm): no stock open_clip module computes it.
    model, _, _ = default_model
    radapter.load_adapters(model, adapter)
    with pytest.raises(radapter.RAdapterError, match=REFUSAL):
        radapter.export_merged(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert radapter.merged_alpha(model) is None


@pytest.mark.slow
def test_linear_text_head_exports_exactly_for_every_shipped_adapter(default_model, tmp_path):
    """Every part but the bridge head converts exactly: image head, merged towers, MiniLM config, tokenizer."""
    model, preprocess, tokenizer = default_model
    bridge = model.text.proj
    linear = nn.Linear(bridge.ridge.in_features, bridge.ridge.out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(bridge.ridge.weight)
    model.text.proj = linear
    try:
        dirs, expected = [], []
        for adapter in ADAPTERS:
            radapter.load_adapters(model, adapter)
            alpha = radapter.adapter_file_info(adapter)["default_alpha"]
            expected.append(merged_features(model, preprocess, tokenizer, alpha))
            out = radapter.export_merged(model, tmp_path / adapter.stem)
            assert radapter.merged_alpha(model) is None
            cfg = json.loads((out / "open_clip_config.json").read_text())
            assert cfg["radapter"]["alpha"] == alpha and cfg["radapter"]["base_model"] == radapter.DEFAULT_MODEL
            assert cfg["model_cfg"]["text_cfg"]["hf_model_name"] == str(out.resolve())
            dirs.append(str(out))
        scale = float(model.logit_scale)
    finally:
        model.text.proj = bridge
    # The documented way to load a folder that was moved after export.
    moved = tmp_path / "moved"
    os.rename(dirs[0], moved)
    dirs[0] = f"moved:{moved}"

    (tmp_path / "images.txt").write_text("\n".join(map(str, IMAGES)))
    (tmp_path / "captions.json").write_text(json.dumps(CAPTIONS))
    work = tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-I", "-c", LOADER, str(tmp_path / "images.txt"),
                    str(tmp_path / "captions.json"), str(work / "f"), *dirs],
                   check=True, cwd=work, env={"HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "")})
    tokens = tokenizer(CAPTIONS).numpy()
    for i, want in enumerate(expected):
        got = np.load(work / f"f{i}.npy")
        assert np.abs(got - want).max() < 1e-5, (ADAPTERS[i].name, float(np.abs(got - want).max()))
        np.testing.assert_array_equal(np.load(work / f"f{i}-tokens.npy"), tokens)
        assert float(np.load(work / f"f{i}-scale.npy")) == pytest.approx(scale)


def test_cli_export_of_shipped_adapter_is_refused_with_one_line(tmp_path, capsys):
    assert main(["export", "--model", radapter.DEFAULT_MODEL, "--adapter", str(ADAPTERS[0]),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert REFUSAL in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
