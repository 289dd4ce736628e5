import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import radapter
from train.cli import config_from_args
from train.config import TrainConfig
from train.run import run

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 190, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


def _folder(root: Path, n: int, noise: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            im = np.clip(np.array(rgb) + rng.normal(0, noise, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(im).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("colours")
    train = _folder(base / "train", 12, 15, 0)
    (train / "core_descriptions.json").write_text(json.dumps({c: f"a flat square of pure {c} colour" for c in COLOURS}))
    return {"train": train, "val": _folder(base / "val", 4, 15, 1), "test": _folder(base / "test", 4, 15, 2)}


def _cfg(folders, out, **kw) -> TrainConfig:
    base = dict(model=radapter.TINY_MODEL, benchmark=None, train_folder=str(folders["train"]),
                val_folder=str(folders["val"]), test_folder=str(folders["test"]), batch_size=8, steps=6,
                warmup_steps=2, eval_alphas=3, out_dir=str(out), log_every=100, ckpt_every=3)
    base.update(kw)
    return TrainConfig(**base)


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("method", ["r-adapter", "drm"])
def test_adapter_methods_write_adapter_metrics_and_plot(folders, tmp_path, method):
    metrics = run(_cfg(folders, tmp_path, method=method))
    res = metrics["results"]
    assert res["chosen_alpha"] in (0.0, 0.5, 1.0)
    assert [p["alpha"] for p in res["all"]["sweep"]] == [0.0, 0.5, 1.0]
    assert {"id", "ood", "ood_avg"} <= res["all"]["at_chosen_alpha"].keys()
    info = radapter.adapter_file_info(tmp_path / "adapter.safetensors")
    assert info["default_alpha"] == res["chosen_alpha"] and info["training"]["method"] == method
    if method == "drm":
        drm = json.loads(info["drm"])
        assert drm["beta"] == 0.5 and len(drm["descriptions"]) == 4
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "config.json").read_text())["method"] == method
    from train.ship import ship

    adapter, sweep = ship(tmp_path, tmp_path / "shipped" / "colours")
    assert radapter.adapter_file_info(adapter)["default_alpha"] == res["chosen_alpha"]
    points = json.loads(sweep.read_text())["points"]
    assert [p["alpha"] for p in points] == [0.0, 0.5, 1.0] and "top1" in points[0]["ood_avg"]


@pytest.mark.parametrize("method", ["full-ft", "full-ft-drm", "lora", "linear-probe", "zero-shot"])
def test_baselines_run(folders, tmp_path, method):
    metrics = run(_cfg(folders, tmp_path, method=method))
    at = metrics["results"]["all"]["at_chosen_alpha"]
    assert 0.0 <= at["id"]["top1"] <= 1.0
    if method.startswith("full-ft"):  # WiSE-FT sweep between the zero-shot and fine-tuned weights
        assert len(metrics["results"]["all"]["sweep"]) == 3
    assert not (tmp_path / "adapter.safetensors").exists()


def test_wiseft_alpha_zero_is_zero_shot(folders, tmp_path):
    zs = run(_cfg(folders, tmp_path / "zs", method="zero-shot"))["results"]["all"]["at_chosen_alpha"]["id"]
    ft = run(_cfg(folders, tmp_path / "ft", method="full-ft"))["results"]["all"]["sweep"][0]["id"]
    assert ft["top1"] == pytest.approx(zs["top1"]) and ft["ece"] == pytest.approx(zs["ece"], abs=1e-6)


def test_lora_merge_keeps_outputs(tiny):
    from train.lora import add_lora, merge_lora

    model, _, tok = tiny
    params = add_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    x, t = torch.randn(2, 3, 32, 32), tok(["a", "b"])
    with torch.no_grad():
        before = model.encode_image(x), model.encode_text(t)
        merge_lora(model)
        after = model.encode_image(x), model.encode_text(t)
    assert not any("parametrizations" in k for k in model.state_dict())
    assert torch.allclose(before[0], after[0], atol=1e-5) and torch.allclose(before[1], after[1], atol=1e-5)


def test_few_shot_and_base_to_novel(folders, tmp_path):
    m = run(_cfg(folders, tmp_path, method="r-adapter", shots=3, base_to_novel=True, batch_size=6))
    assert m["training"]["examples"] == 6  # 3 shots x 2 base classes
    res = m["results"]
    assert {"base", "novel", "harmonic_mean"} <= res.keys()
    b, n = res["base"]["at_chosen_alpha"]["id"]["top1"], res["novel"]["at_chosen_alpha"]["id"]["top1"]
    assert res["harmonic_mean"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)
    assert len(res["novel"]["at_chosen_alpha"]["id"]) and res["novel"]["at_chosen_alpha"]["id"]["n"] == 8


def test_retrieval_training_from_a_caption_table(folders, tmp_path):
    rows = [{"image": str(p), "caption": f"a {p.parent.name} square"} for p in sorted(folders["train"].rglob("*.png"))]
    table = tmp_path / "pairs.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in rows))
    m = run(_cfg(folders, tmp_path / "out", method="r-adapter", task="retrieval", train_folder=None,
                 train_table=str(table)))
    assert m["training"]["steps"] == 6 and (tmp_path / "out" / "adapter.safetensors").is_file()


def _final_state(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def test_kill_and_resume_continues_exactly(folders, tmp_path):
    args = ["--model", radapter.TINY_MODEL, "--benchmark", "", "--train-folder", str(folders["train"]),
            "--batch-size", "8", "--steps", "40", "--warmup-steps", "4", "--ckpt-every", "5", "--eval-alphas", "2",
            "--drop-prob", "0.3"]
    straight = _cli(*args, "--out-dir", str(tmp_path / "a"))
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    victim = _cli(*args, "--out-dir", str(tmp_path / "b"), start_new_session=True)
    ckpt = tmp_path / "b" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # kill -9 mid-run
    victim.wait()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 5 <= step < 40, "the run was not interrupted in the middle; make it longer"
    resumed = _cli(*args, "--out-dir", str(tmp_path / "b"), "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_ddp_equals_one_process(folders, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    args = ["-m", "train", "--model", radapter.TINY_MODEL, "--benchmark", "", "--train-folder",
            str(folders["train"]), "--batch-size", "8", "--steps", "4", "--warmup-steps", "1", "--drop-prob", "0",
            "--eval-alphas", "2", "--ckpt-every", "100"]
    one = subprocess.run([sys.executable, *args, "--out-dir", str(tmp_path / "one")], cwd=ROOT, capture_output=True,
                         text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29517", *args, "--out-dir",
                          str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _final_state(tmp_path / "one"), _final_state(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6), k


def test_cli_config_file_and_flags(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"batch_size": 16, "steps": 7, "method": "drm"}))
    cfg = config_from_args(["--config", str(cfg_file), "--steps", "9", "--no-resume"])
    assert (cfg.batch_size, cfg.steps, cfg.method, cfg.lr, cfg.warmup_steps) == (16, 9, "drm", 5e-4, 500)
    cfg_file.write_text(json.dumps({"bad_option": 1}))
    with pytest.raises(ValueError, match="unknown options"):
        config_from_args(["--config", str(cfg_file)])
    help_text = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=ROOT, capture_output=True,
                               text=True).stdout
    assert "--drm-lambda" in help_text and "paper: 5e-4" in help_text


def test_imagenet_recipe_dry_run(folders, tmp_path):
    """The paper's recipe file parses and runs end to end (2 steps) with the model and data swapped for tiny ones."""
    cfg = config_from_args(["--config", str(ROOT / "train/configs/imagenet-vitb16.json"), "--model",
                            radapter.TINY_MODEL, "--pretrained", "", "--train-folder", str(folders["train"]),
                            "--test-folder", str(folders["test"]), "--classnames", "", "--dry-run", "--batch-size",
                            "8", "--workers", "0", "--out-dir", str(tmp_path)])
    assert (cfg.lr, cfg.epochs, cfg.warmup_steps, cfg.eps, cfg.margin, cfg.temperature) == (5e-4, 10, 500, 0.02,
                                                                                             0.05, 0.01)
    cfg.pretrained = None
    cfg.classnames = None
    m = run(cfg)
    assert m["training"]["steps"] == 2 and m["results"] == {"dry_run": True}
