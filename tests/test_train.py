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


def test_no_test_sweep_tests_only_the_chosen_alpha_and_one(folders, tmp_path):
    res = run(_cfg(folders, tmp_path, method="r-adapter", test_sweep=False))["results"]
    assert [p["alpha"] for p in res["val_sweep"]] == [0.0, 0.5, 1.0]
    assert [p["alpha"] for p in res["all"]["sweep"]] == sorted({res["chosen_alpha"], 1.0})
    best = max(res["val_sweep"], key=lambda p: p["top1"])["alpha"]
    assert res["chosen_alpha"] == best == res["all"]["at_chosen_alpha"]["alpha"]


def test_ship_writes_a_retrieval_sweep_of_mean_recall(tmp_path):
    from radapter.evaluation import plot_alpha_sweep
    from train.ship import sweep_of

    r = {"i2t_r1": 0.2, "t2i_r1": 0.4}
    metrics = {"method": "r-adapter", "config": {"benchmark": "emoji"}, "results": {"chosen_alpha": 1.0, "points": [
        {"alpha": 1.0, "val_r1": 0.3, "id": r, "ood": {"i2t_r1": 0.1, "t2i_r1": 0.1}},
        {"alpha": 0.0, "val_r1": 0.1, "id": r, "ood": r}, {"alpha": 0.5, "val_r1": 0.2}]}}
    sweep = sweep_of(metrics)
    assert sweep["key"] == "r1" and [p["alpha"] for p in sweep["points"]] == [0.0, 1.0]  # untested 0.5 left out
    assert sweep["points"][1]["id"]["r1"] == pytest.approx(0.3) and sweep["points"][1]["ood_avg"]["r1"] == 0.1
    assert plot_alpha_sweep(sweep, tmp_path / "r1.png").read_bytes()[:4] == b"\x89PNG"
    assert sweep_of({"config": {}, "results": {}}) is None


def test_wiseft_alpha_zero_is_zero_shot(folders, tmp_path):
    zs = run(_cfg(folders, tmp_path / "zs", method="zero-shot"))["results"]["all"]["at_chosen_alpha"]["id"]
    ft = run(_cfg(folders, tmp_path / "ft", method="full-ft"))["results"]["all"]["sweep"][0]["id"]
    assert ft["top1"] == pytest.approx(zs["top1"]) and ft["ece"] == pytest.approx(zs["ece"], abs=1e-6)


def test_lora_merge_keeps_outputs(tiny):
    """peft LoRA on the tiny ViT (attention sites: the whole nn.MultiheadAttention), merged with
    peft's merge_and_unload: the plain model again, with the same outputs."""
    from peft.tuners.lora import LoraLayer

    from train.lora import add_lora, has_lora, merge_lora

    model, _, tok = tiny
    params = add_lora(model, rank=4, alpha=8.0)
    assert has_lora(model) and any(isinstance(m, LoraLayer) for m in model.modules())
    assert all(p.requires_grad for p in params)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    x, t = torch.randn(2, 3, 32, 32), tok(["a", "b"])
    with torch.no_grad():
        before = model.encode_image(x), model.encode_text(t)
        merge_lora(model)
        after = model.encode_image(x), model.encode_text(t)
    assert not any("lora_" in k or "base_layer" in k for k in model.state_dict())
    assert not has_lora(model) and not any(isinstance(m, LoraLayer) for m in model.modules())
    assert torch.allclose(before[0], after[0], atol=1e-5) and torch.allclose(before[1], after[1], atol=1e-5)


def test_lora_reaches_the_convs_of_the_offline_model_and_merges():
    """conv_bn sites: LoRA goes on the 1x1 conv that feeds each BatchNorm (the site's fold target)."""
    from train.lora import add_lora, merge_lora

    model, _, tok = radapter.load_model()
    sites = radapter.site_weights(model)
    params = add_lora(model, rank=2, alpha=4.0)
    assert len(params) == 2 * 28  # 12 text linears + 16 image convs
    assert sum(p.numel() for p in params) == sum(2 * (w.shape[0] + w[0].numel()) for w in sites.values())
    with torch.no_grad():
        for p in params[1::2]:
            p.normal_(0, 0.01)  # lora_B starts at zero: make the delta real
    x, t = torch.randn(1, 3, 224, 224), tok(["a cat"])
    with torch.no_grad():
        base = radapter.load_model()[0].encode_image(x)
        before = model.encode_image(x), model.encode_text(t)
        merge_lora(model)
        after = model.encode_image(x), model.encode_text(t)
    assert not torch.allclose(before[0], base, atol=1e-4)  # the image-tower LoRA is live
    assert torch.allclose(before[0], after[0], atol=1e-4) and torch.allclose(before[1], after[1], atol=1e-4)


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


# ------------------------------------------------------------------ results matrix, report

FAKE_TRAIN = """
import json, os, sys, time
from pathlib import Path
argv = sys.argv[3:]  # python -m train ...
opt = {a: (b if not b.startswith("--") else "") for a, b in zip(argv, [*argv[1:], "--"]) if a.startswith("--")}
out = Path(opt["--out-dir"])
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(str(out) + "\\n")
if opt["--method"] == os.environ.get("FAKE_FAIL"):
    sys.exit(1)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
(out / "checkpoint.pt").write_text("state")
lr = float(opt.get("--lr", 5e-4))
training = {}
if "--val-every" in opt:  # a learning-rate search run: ID validation best at lr 1e-3
    import math
    training["val_curve"] = [{"step": int(opt["--steps"]), "top1": 1 - abs(math.log10(lr) + 3) / 10}]
(out / "metrics.json").write_text(json.dumps({"method": opt["--method"], "seed": int(opt["--seed"]),
                                               "config": {"lr": lr}, "training": training}))
"""


@pytest.fixture
def fake_python(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    exe = tmp_path / "fake-python"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    exe.chmod(0o755)
    return str(exe)


def test_matrix_plan_gives_every_method_the_same_budget():
    from train.matrix import Settings, plan

    settings = Settings()
    runs = plan(settings, [0, 1, 2])
    keys = {r.key for r in runs}
    assert "emoji/zero-shot/seed0" in keys and "emoji/zero-shot/seed1" not in keys  # deterministic: once
    assert {f"fmnist/linear-probe/seed{s}" for s in range(3)} <= keys  # its training subset depends on the seed
    assert "emoji/linear-probe/seed1" not in keys
    assert {f"emoji/drm/seed{s}" for s in range(3)} | {f"fmnist/full-ft-drm/seed{s}" for s in range(3)} <= keys
    assert "fmnist-base2novel/r-adapter/seed0" in keys and "fmnist-base2novel/r-adapter/seed1" not in keys
    assert "emoji-retrieval/r-adapter/seed0" in keys
    assert {f"emoji-backgrounds/{m}/seed{s}" for m in ("full-ft", "lora", "r-adapter", "drm") for s in range(3)} <= keys
    budgets = set()
    for r in runs:
        argv = settings.train_argv(r, r.out_dir(Path("m")))
        opt = {a: b for a, b in zip(argv, [*argv[1:], "--"], strict=True) if a.startswith("--")}
        budgets.add((r.group.benchmark, opt["--steps"], opt["--batch-size"], opt.get("--train-limit"),
                     opt.get("--eval-limit"), opt["--eval-alphas"]))
        assert ("--lr" in argv) == r.method.startswith("full-ft")
    assert len(budgets) == 3  # one budget per benchmark, whatever the method


def test_matrix_skips_finished_runs_and_records_failures(tmp_path, fake_python, monkeypatch):
    from train.matrix import GROUPS, Run, Settings, main, plan, run_matrix

    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    root = tmp_path / "m"
    runs = plan(Settings(), [0, 1], groups=["emoji"], methods=["zero-shot", "r-adapter"])
    assert len(runs) == 3
    first = run_matrix(runs, root, Settings(), jobs=2, python=fake_python)
    assert (first["done"], first["skipped"]) == (3, 0)
    assert not list(root.rglob("checkpoint.pt"))  # finished runs drop their checkpoint
    assert json.loads((root / "emoji/r-adapter/seed1/matrix_run.json").read_text())["status"] == "done"
    second = run_matrix(runs, root, Settings(), jobs=2, python=fake_python)
    assert (second["done"], second["skipped"]) == (0, 3)
    (root / "emoji/r-adapter/seed0/metrics.json").unlink()
    third = run_matrix(runs, root, Settings(), jobs=2, python=fake_python)
    assert (third["done"], third["skipped"]) == (1, 2)
    assert len(calls.read_text().splitlines()) == 4
    monkeypatch.setenv("FAKE_FAIL", "drm")
    bad = run_matrix([Run(GROUPS[0], "drm", 0)], root, Settings(), jobs=1, python=fake_python)
    assert bad["failed"] == 1 and bad["records"][0]["returncode"] == 1
    monkeypatch.setenv("FAKE_SLEEP", "30")
    t = time.time()
    slow = run_matrix([Run(GROUPS[0], "lora", 0), Run(GROUPS[0], "lora", 1)], root, Settings(), jobs=1,
                      python=fake_python, time_limit=1)
    assert time.time() - t < 20 and (slow["stopped"], slow["not started"]) == (1, 1)
    assert main(["--out", str(root), "--groups", "emoji", "--dry-run"]) == 0


def test_matrix_lr_search_gives_every_method_the_same_tries_and_trains_at_the_best(tmp_path, fake_python,
                                                                                  monkeypatch):
    from train.matrix import Settings, choose_lrs, main, search_plan

    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.txt"))
    monkeypatch.setattr(sys, "executable", fake_python)  # main runs each cell with sys.executable
    settings = Settings()
    search = search_plan(settings, [0.5, 1, 2], 0, groups=["emoji-backgrounds"], methods=["r-adapter", "full-ft"])
    assert sorted((r.method, r.lr) for r in search) == [("full-ft", 1.5e-5), ("full-ft", 3e-5), ("full-ft", 6e-5),
                                                        ("r-adapter", 2.5e-4), ("r-adapter", 5e-4),
                                                        ("r-adapter", 1e-3)]
    assert all(r.search and r.seed == 0 and r.key.startswith("lr-search/") for r in search)
    argv = settings.train_argv(search[0], Path("x"))
    assert argv[argv.index("--val-every") + 1] == str(settings.steps)  # scored once, at the end
    root = tmp_path / "m"
    args = ["--out", str(root), "--groups", "emoji-backgrounds", "--methods", "zero-shot", "r-adapter", "full-ft",
            "--seeds", "0", "1", "--lr-search", "0.5", "1", "2", "--no-fingerprint", "--jobs", "2"]
    assert main(args) == 0
    matrix = json.loads((root / "matrix.json").read_text())
    chosen = matrix["lr_search"]["groups"]["emoji-backgrounds"]
    assert chosen["r-adapter"]["chosen"] == 1e-3 and chosen["full-ft"]["chosen"] == 6e-5
    assert len(chosen["r-adapter"]["tried"]) == len(chosen["full-ft"]["tried"]) == 3  # the same budget
    for seed in (0, 1):  # every seed of the matrix at the chosen rate; zero-shot untouched
        m = json.loads((root / f"emoji-backgrounds/r-adapter/seed{seed}/metrics.json").read_text())
        assert m["config"]["lr"] == 1e-3
    assert json.loads((root / "emoji-backgrounds/full-ft/seed1/metrics.json").read_text())["config"]["lr"] == 6e-5
    assert (root / "emoji-backgrounds/zero-shot/seed0/metrics.json").is_file()
    from train.report import header_lines

    header = "\n".join(header_lines(matrix, {}, "python -m train.report"))
    assert "Learning rate, chosen on ID validation" in header and "emoji-backgrounds/r-adapter 0.001 (of" in header
    # a finished run at another rate is not silently kept
    (root / "emoji-backgrounds/r-adapter/seed1/metrics.json").write_text(json.dumps({"config": {"lr": 5e-4}}))
    assert main(args) == 2
    # a tie keeps the usual rate
    for r in search:
        d = r.out_dir(tmp_path / "tie")
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"training": {"val_curve": [{"step": 1, "top1": 0.5}]}}))
    assert choose_lrs(search, tmp_path / "tie", settings)["emoji-backgrounds"]["r-adapter"]["chosen"] == 5e-4


def _classification_metrics(method: str, seed: int, oods: list[str], sweep: bool, params: int,
                            test_sweep: bool = True) -> dict:
    def point(alpha, base):
        acc = {o: base - 0.1 - 0.01 * i for i, o in enumerate(oods)}
        return {"alpha": alpha, "id": {"top1": base}, "ood": {o: {"top1": a} for o, a in acc.items()},
                "ood_avg": {"top1": sum(acc.values()) / len(acc)}}

    base = 0.5 + 0.1 * seed
    chosen = 0.5 if sweep else None
    part = {"at_chosen_alpha": point(chosen, base)}
    results = {"chosen_alpha": chosen, "all": part, "alphas": [0.0, 0.5, 1.0] if sweep else [1.0]}
    if sweep:
        part["sweep"] = [point(0.0, 0.3), point(0.5, base), point(1.0, base - 0.05)][0 if test_sweep else 1:]
        results["val_sweep"] = [{"alpha": a, "top1": v} for a, v in ((0.0, 0.2), (0.5, base + 0.02), (1.0, base))]
    return {"method": method, "training": {"trainable_parameters": params}, "results": results}


def _write(root: Path, key: str, metrics: dict, wall: float = 10.0) -> None:
    d = root / key
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "matrix_run.json").write_text(json.dumps({"run": key, "status": "done", "wall_s": wall}))


def test_report_renders_tables_from_metrics(tmp_path):
    from train.report import main

    root = tmp_path / "m"
    fm_oods = [f"c{i}-2" for i in range(12)]
    _write(root, "emoji/zero-shot/seed0", _classification_metrics("zero-shot", 0, ["twitter"], False, 0))
    _write(root, "fmnist/zero-shot/seed0", _classification_metrics("zero-shot", 0, fm_oods, False, 0))
    for s in range(3):
        _write(root, f"emoji/r-adapter/seed{s}", _classification_metrics("r-adapter", s, ["twitter"], True, 2080796))
        _write(root, f"emoji/full-ft/seed{s}", _classification_metrics("full-ft", s, ["twitter"], True, 28094569))
        _write(root, f"fmnist/r-adapter/seed{s}", _classification_metrics("r-adapter", s, fm_oods, True, 2080796,
                                                                          test_sweep=False))
    recall = {"t2i_r1": 0.4, "i2t_r1": 0.5}
    _write(root, "emoji-retrieval/r-adapter/seed0", {
        "training": {"trainable_parameters": 2080796},
        "results": {"chosen_alpha": 1.0, "points": [{"alpha": 0.0, "id": recall, "ood": recall},
                                                    {"alpha": 1.0, "id": recall, "ood": {"t2i_r1": 0.3,
                                                                                         "i2t_r1": 0.2}}]}})
    _write(root, "emoji-base2novel/r-adapter/seed0", {
        "training": {"trainable_parameters": 2080796},
        "results": {"chosen_alpha": 0.5, "harmonic_mean": 0.48, "base": {"sweep": [],
                    "at_chosen_alpha": {"id": {"top1": 0.6}}}, "novel": {"at_chosen_alpha": {"id": {"top1": 0.4}}}}})
    (root / "matrix.json").write_text(json.dumps({
        "seeds": [0, 1, 2], "model": {"name": "m", "fingerprint": "ab" * 32, "embed_dim": 1281},
        "settings": {"steps": 300, "batch_size": 32, "eval_alphas": 3, "precision": "fp32",
                     "lr": {"full-ft": 3e-5}, "train_limit": {"fmnist": 10000}, "eval_limit": {"fmnist": 500}},
        "invocations": [{"command": "python -m train.matrix --jobs 10", "finished": "2026-11-23T10:00:00+00:00",
                         "machine": {"gpu": "NVIDIA H100", "cpus": 16, "torch": "2.11", "python": "3.12"},
                         "jobs": 10, "wall_s": 400.0, "runs": {"done": 14}}]}))
    out = tmp_path / "docs" / "results.md"
    shipped = tmp_path / "adapters"
    shipped.mkdir()
    (shipped / "emoji-names.sweep.json").write_text(json.dumps({
        "benchmark": "emoji", "method": "r-adapter", "chosen_alpha": 1.0, "key": "r1", "metric": "R@1",
        "points": [{"alpha": 0.0, "id": {"r1": 0.05}, "ood_avg": {"r1": 0.04}},
                   {"alpha": 1.0, "id": {"r1": 0.125}, "ood_avg": {"r1": 0.1}}]}))
    assert main([str(root), "--out", str(out), "--adapters", str(shipped)]) == 0
    md = out.read_text()
    assert "| R-Adapter | 2.08M | 0,1,2 | 0.5 | 60.0 ± 10.0 | 50.0 ± 10.0 | 50.0 ± 10.0 |" in md
    assert "| full FT (FLYP) | 28.09M | 0,1,2 | 1 | 55.0 ± 10.0 |" in md  # the alpha = 1 end of the sweep
    assert "| zero-shot | 0 | 0 | — | 50.0 | 40.0 | 40.0 |" in md
    assert "| c11-2 | 29.0 | 39.0 ± 10.0 |" in md  # fmnist: per-OOD table (zero-shot, R-Adapter)
    assert "| R-Adapter | 2.08M | 0 | 1 | 40.0 | 50.0 | 30.0 | 20.0 |" in md  # retrieval R@1
    assert "| emoji | R-Adapter | 2.08M | 0 | 0.5 | 60.0 | 40.0 | 48.0 |" in md  # base-to-novel
    assert "python -m train.matrix --jobs 10" in md and "NVIDIA H100" in md and "2026-11-23" in md
    assert "R-Adapter vs WiSE-FT of full FT: ID +0.0" in md and "`emoji/lora`" in md
    # emoji swept the test split at every alpha: that table; fmnist tested two alphas: the validation curve
    assert "Accuracy against alpha (emoji" in md and "| 0.5 | 60.0 ± 10.0 | 50.0 ± 10.0 | 60.0 ± 10.0 |" in md
    assert "Accuracy against alpha (fmnist" not in md and "ID validation top-1 (%) against alpha (fmnist" in md
    assert "| 0.5 | 62.0 ± 10.0 |" in md
    assert "`emoji-names` (emoji, r-adapter; R@1, %)" in md and "| 1 (chosen) | 12.5 | 10.0 |" in md
    figures = json.loads((tmp_path / "docs" / "bench" / "results.json").read_text())
    row = figures["classification"]["emoji"]["R-Adapter"]
    assert row["id"]["values"] == [0.5, 0.6, 0.7] and row["alpha"] == [0.5, 0.5, 0.5]
    assert main([str(tmp_path / "empty"), "--out", str(out)]) == 2


def test_grad_checkpointing_keeps_less_and_trains_the_same_adapters(folders, tmp_path):
    from benchmarks.train_cost import saved_activations_bytes, setup
    from train.loop import enable_grad_checkpointing

    plain = setup(radapter.TINY_MODEL, "r_adapter", 8, "cpu")
    recomputed = setup(radapter.TINY_MODEL, "r_adapter", 8, "cpu")
    enable_grad_checkpointing(recomputed.model)
    assert saved_activations_bytes(recomputed) < 0.6 * saved_activations_bytes(plain)

    # Same steps, same seed: the recomputed blocks replay the random state, so adapter
    # dropping draws the same masks and the adapters come out the same.
    for on in (False, True):
        run(_cfg(folders, tmp_path / str(on), grad_checkpointing=on, drop_prob=0.5, eval_alphas=2))
    a, b = (_final_state(tmp_path / str(on)) for on in (False, True))
    adapters = [k for k in a if "radapter" in k or "adapter" in k]
    assert adapters and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_trains_on_cpu(folders, tmp_path):
    from train.loop import autocast_context

    cpu = torch.device("cpu")
    with autocast_context(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast_context(cpu, "fp16"):  # fp16 autocast is GPU-only: fp32 on CPU
        assert not torch.is_autocast_enabled("cpu")
    for precision in ("fp32", "bf16"):
        run(_cfg(folders, tmp_path / precision, precision=precision, drop_prob=0.0, eval_alphas=2))
    a, b = (_final_state(tmp_path / p) for p in ("fp32", "bf16"))
    adapters = [k for k in a if k.endswith("weight") and "radapter" in k]
    assert adapters
    diff = [float((a[k] - b[k]).norm() / a[k].norm()) for k in adapters]
    # the products ran in bf16 (the adapters differ), and training followed the same course
    assert max(diff) > 0 and sum(diff) / len(diff) < 0.2


def _group_metrics(method: str, seed: int, params: int, curve: dict[float, tuple[float, float, float, float]],
                   chosen: float | None, check: float | None = None) -> dict:
    """Metrics of a run on a grouped benchmark: ``curve[alpha] = (ID, ID worst, OOD, OOD worst)``."""
    def point(alpha):
        i, iw, o, ow = curve[alpha]
        return {"alpha": alpha, "id": {"top1": i, "worst_group": iw},
                "ood": {"conflict": {"top1": o, "worst_group": ow}},
                "ood_avg": {"top1": o, "worst_group": ow}}

    alphas = sorted(curve)
    part = {"at_chosen_alpha": point(chosen if chosen is not None else alphas[-1])}
    if len(alphas) > 1:
        part["sweep"] = [point(a) for a in alphas]
    metrics = {"method": method, "training": {"trainable_parameters": params},
               "results": {"chosen_alpha": chosen, "alphas": alphas, "all": part}}
    if check is not None:
        metrics["description_check"] = {"chosen": 0, "default_head_top1": 0.6, "candidates": [{"top1": check}]}
    return metrics


def test_report_worst_groups_fixed_alpha_goals_and_plot(tmp_path):
    from train.report import main

    root = tmp_path / "m"
    g = "emoji-backgrounds"
    _write(root, f"{g}/zero-shot/seed0", _group_metrics("zero-shot", 0, 0, {1.0: (0.5, 0.3, 0.6, 0.2)}, None))
    ft = {0.0: (0.5, 0.3, 0.6, 0.2), 0.5: (0.8, 0.6, 0.55, 0.25), 1.0: (0.95, 0.9, 0.3, 0.05)}
    ra = {0.0: (0.5, 0.3, 0.6, 0.2), 0.5: (0.75, 0.6, 0.6, 0.3), 1.0: (0.9, 0.85, 0.4, 0.1)}
    drm = {0.0: (0.5, 0.3, 0.6, 0.2), 0.5: (0.74, 0.6, 0.62, 0.31), 1.0: (0.9, 0.85, 0.45, 0.12)}
    for s in range(2):
        _write(root, f"{g}/full-ft/seed{s}", _group_metrics("full-ft", s, 28_000_000, ft, 1.0))
        _write(root, f"{g}/r-adapter/seed{s}", _group_metrics("r-adapter", s, 2_000_000, ra, 1.0))
        _write(root, f"{g}/drm/seed{s}", _group_metrics("drm", s, 2_000_000, drm, 1.0, check=0.58))
    out = tmp_path / "docs" / "results.md"
    assert main([str(root), "--out", str(out), "--adapters", str(tmp_path / "none")]) == 0
    md = out.read_text()
    # columns: ID, conflict, avg OOD, ID worst group, conflict worst group, avg OOD worst group
    assert "| full FT (FLYP) | 28.00M | 0,1 | 1 | 95.0 ± 0.0 | 30.0 ± 0.0 | 30.0 ± 0.0 | 90.0 ± 0.0 | 5.0 ± 0.0 |" in md
    assert "| R-Adapter, alpha 0.5 | 2.00M | 0,1 | 0.5 (fixed) | 75.0 ± 0.0 | 60.0 ± 0.0 |" in md
    assert "| 58.0 ± 0.0 / 60.0 ± 0.0 |" in md  # DRM row: description head / zero-shot head on ID val
    assert "full FT's OOD worst group falls below zero-shot's: 5.0 vs 20.0 — met" in md
    assert "R-Adapter at alpha 0.5 vs WiSE-FT at alpha 0.5: OOD average 60.0 vs 55.0, OOD worst group 30.0 vs " \
           "25.0, with 0.07x its trainable parameters — met" in md
    assert "R-Adapter + DRM beats R-Adapter by >= 3 points of OOD worst group (alpha chosen on ID val): 12.0 vs " \
           "10.0 (+2.0) — missed" in md
    png = tmp_path / "docs" / "plots" / f"{g}-alpha.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and f"](plots/{g}-alpha.png)" in md
    budget = tmp_path / "budget"
    curve = _group_metrics("r-adapter", 0, 2_000_000, ra, 1.0)
    curve["training"]["val_curve"] = [{"step": 50, "top1": 0.8}, {"step": 100, "top1": 0.9}]
    _write(budget, f"{g}/r-adapter/seed0", curve)
    assert main([str(root), "--out", str(out), "--adapters", str(tmp_path / "none"), "--budget-runs",
                 str(budget)]) == 0
    md = out.read_text()
    assert f"## Budget check ({g})" in md and "| 50 | 80.0 |" in md and "| 100 | 90.0 |" in md
    # An earlier results.json: its other benchmarks are carried over, marked, with their own matrix.
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({
        "generated_by": "python -m train.report runs/old", "matrix": {"settings": {"steps": 60}, "invocations": [
            {"command": "python -m train.matrix --steps 60", "finished": "2026-11-23T10:00:00+00:00",
             "machine": {"cpus": 2}, "jobs": 2, "wall_s": 9.0, "runs": {"done": 1}}]},
        "classification": {g: {}, "emoji": {"zero-shot": {
            "method": "zero-shot", "point": "chosen", "trainable_parameters": 0, "seeds": [0], "alpha": [None],
            "id": {"mean": 0.345, "std": None}, "ood": {"twitter": {"mean": 0.25, "std": None}},
            "ood_avg": {"mean": 0.25, "std": None}}}},
        "retrieval": {}, "base_to_novel": {}, "sweeps": {}, "val_sweeps": {}}))
    assert main([str(root), "--out", str(out), "--adapters", str(tmp_path / "none"), "--earlier",
                 str(earlier)]) == 0
    md = out.read_text()
    assert "(earlier matrix)" in md and "| zero-shot | 0 | 0 | — | 34.5 | 25.0 | 25.0 |" in md
    assert "**Earlier matrix** (emoji)" in md and "python -m train.matrix --steps 60" in md
    assert md.index("## Emoji on backgrounds") < md.index("## Emoji categories")  # the new benchmark first
    carried = json.loads((tmp_path / "docs" / "bench" / "results.json").read_text())
    assert carried["earlier"]["groups"] == ["emoji"] and carried["earlier"]["source"] == str(earlier)


@pytest.mark.parametrize("method", ["r-adapter", "full-ft"])
def test_val_every_records_the_curve_and_trains_the_same(folders, tmp_path, method):
    plain = run(_cfg(folders, tmp_path / "plain", method=method, eval_alphas=2))
    watched = run(_cfg(folders, tmp_path / "watched", method=method, eval_alphas=2, val_every=4))
    curve = watched["training"]["val_curve"]
    assert [p["step"] for p in curve] == [4, 6] and all(0 <= p["top1"] <= 1 for p in curve)
    assert "val_curve" not in plain["training"]
    # looking at validation does not change what trains (its DataLoader's seed draw is undone)
    assert watched["training"]["final_loss"] == plain["training"]["final_loss"]
    assert watched["results"]["all"]["sweep"] == plain["results"]["all"]["sweep"]
