import json
import subprocess
import sys

import torch

import radapter
from tests.conftest import randomize_adapters

LOADER = """
import sys, torch, open_clip
model, _, _ = open_clip.create_model_and_transforms('local-dir:' + sys.argv[1])
model.eval()
tok = open_clip.get_tokenizer('local-dir:' + sys.argv[1])
x = torch.load(sys.argv[2])
with torch.no_grad():
    out = torch.cat([model.encode_image(x), model.encode_text(tok(['a red square', 'a dog']))], 1)
torch.save(out, sys.argv[3])
assert 'radapter' not in sys.modules
"""


def test_export_loads_in_plain_open_clip(tiny, tmp_path):
    model, _, tok = tiny
    radapter.add_adapters(model, radapter.RAdapterConfig(rank=4))
    randomize_adapters(model)
    x = torch.randn(2, 3, 32, 32)
    radapter.merge_adapters(model, 0.6)
    with torch.no_grad():
        expected = torch.cat([model.encode_image(x), model.encode_text(tok(["a red square", "a dog"]))], 1)
    radapter.unmerge_adapters(model)
    out = radapter.export_merged(model, tmp_path / "merged", alpha=0.6)
    assert radapter.merged_alpha(model) is None  # merge state restored
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["radapter"]["alpha"] == 0.6 and "model_cfg" in cfg
    torch.save(x, tmp_path / "x.pt")
    # A separate interpreter, started outside the repo, so radapter is not importable by accident.
    subprocess.run([sys.executable, "-c", LOADER, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    got = torch.load(tmp_path / "y.pt")
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    # Exported state has no adapter tensors and the model re-loads through radapter too.
    again, _, _ = radapter.load_model(f"local-dir:{out}")
    assert not any(".radapter." in k for k in again.state_dict())


def test_export_cli_and_info(tiny, tmp_path, capsys):
    model, _, _ = tiny
    local = tmp_path / "base"
    # A base model users have locally as a folder; the adapter is trained on it.
    radapter.add_adapters(model, radapter.RAdapterConfig())
    radapter.export_merged(model, local, alpha=0.0)
    base, _, _ = radapter.load_model(f"local-dir:{local}")
    radapter.add_adapters(base, radapter.RAdapterConfig())
    randomize_adapters(base)
    adapter = radapter.save_adapters(base, tmp_path / "a.safetensors", default_alpha=0.8)
    from radapter.cli import main

    assert main(["export", "--model", f"local-dir:{local}", "--adapter", str(adapter), "--out",
                 str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "open_clip_config.json").read_text())["radapter"]["alpha"] == 0.8
    assert main(["info", str(adapter)]) == 0
    assert '"default_alpha": 0.8' in capsys.readouterr().out
    assert main(["info", str(tmp_path / "nope.safetensors")]) == 2
    assert "adapter file not found" in capsys.readouterr().err


def test_export_refuses_models_open_clip_cannot_rebuild(tiny, tmp_path):
    import pytest

    model, _, _ = tiny
    model.__class__ = type("BridgeLike", (type(model),), {})
    radapter.add_adapters(model, radapter.RAdapterConfig())
    with pytest.raises(radapter.RAdapterError, match="plain open_clip"):
        radapter.export_merged(model, tmp_path / "x", alpha=0.5)
    assert not (tmp_path / "x").exists()
