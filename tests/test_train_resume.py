"""``--resume``: refused option changes, the previous checkpoint as a fallback, the final loss."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import radapter
from radapter.errors import RAdapterError
from train.cli import build_parser
from train.config import TrainConfig
from train.run import run

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 190, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir()
        for i in range(12):
            im = np.clip(np.array(rgb) + rng.normal(0, 15, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(im).save(root / name / f"{i}.png")
    return root


def _cfg(folder: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model=radapter.TINY_MODEL, benchmark=None, train_folder=str(folder), batch_size=8, steps=6,
                warmup_steps=2, eval_alphas=2, out_dir=str(out), log_every=100, ckpt_every=3)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def finished(train_folder, tmp_path_factory) -> tuple[Path, dict]:
    """A finished 6-step run that wrote checkpoints at steps 3 and 6, and its metrics."""
    out = tmp_path_factory.mktemp("finished")
    return out, run(_cfg(train_folder, out))


def _copy(finished, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished[0], tmp_path / "run"))


def _checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _strict_json(path: Path) -> dict:
    def refuse(token: str):
        raise AssertionError(f"{path} holds {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


# ------------------------------------------------------------------ changed options


@pytest.mark.parametrize("change, shown", [
    ({"lr": 1e-3}, ["--lr 0.0005 -> 0.001"]),
    ({"steps": 8}, ["--steps 6 -> 8"]),
    ({"train_folder": "other"}, ["--train-folder '", "' -> '", "other'"]),
    ({"lr": 1e-3, "seed": 1, "drop_prob": 0.5}, ["--lr 0.0005 -> 0.001", "--seed 0 -> 1", "--drop-prob 0.2 -> 0.5"]),
])
def test_resume_refuses_changed_run_options(train_folder, finished, tmp_path, change, shown):
    out = _copy(finished, tmp_path)
    if "train_folder" in change:
        change = {"train_folder": str(tmp_path / change["train_folder"])}
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RAdapterError) as e:
        run(_cfg(train_folder, out, resume=True, **change))
    msg = str(e.value)
    assert "\n" not in msg and str(out / "checkpoint.pt") in msg and "--resume-allow-changes" in msg
    assert all(s in msg for s in shown), msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, config.json included


def test_resume_allow_changes_continues_with_the_new_options(train_folder, finished, tmp_path, caplog):
    out = _copy(finished, tmp_path)
    with caplog.at_level(logging.WARNING, logger="train"):
        m = run(_cfg(train_folder, out, resume=True, resume_allow_changes=True, lr=1e-3, steps=8))
    warned = [r.getMessage() for r in caplog.records if "--resume-allow-changes" in r.getMessage()]
    assert len(warned) == 1 and "--lr 0.0005 -> 0.001" in warned[0] and "--steps 6 -> 8" in warned[0]
    assert m["training"]["steps"] == 8 and m["config"]["lr"] == 1e-3
    state = _checkpoint(out / "checkpoint.pt")
    assert state["step"] == 8 and state["config"]["lr"] == 1e-3
    assert state["scheduler"]["base_lrs"] == [1e-3]  # the new learning rate trained steps 7 and 8
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [1e-3]
    assert "--resume-allow-changes" in build_parser().format_help()


def test_resume_accepts_changes_that_do_not_alter_the_run(train_folder, finished, tmp_path, caplog):
    from train.config import RESUME_FIXED, RESUME_FREE

    out = _copy(finished, tmp_path)  # another folder: out_dir differs from the checkpoint's
    (out / "checkpoint.pt").unlink()
    shutil.copy(out / "checkpoint.prev.pt", out / "checkpoint.pt")  # step 3: three steps left to train
    with caplog.at_level(logging.WARNING, logger="train"):
        m = run(_cfg(train_folder, out, resume=True, log_every=1, ckpt_every=100, eval_alphas=3, test_sweep=False))
    assert m["training"]["steps"] == 6 and not [r for r in caplog.records if "option" in r.getMessage()]
    assert not {"lr", "steps", "train_folder", "seed", "batch_size", "precision"} & RESUME_FREE
    assert not RESUME_FIXED & RESUME_FREE and {f.name for f in TrainConfig.fields()} >= (RESUME_FIXED | RESUME_FREE)


def test_resume_allow_changes_never_changes_what_the_checkpoint_holds(train_folder, finished, tmp_path):
    out = _copy(finished, tmp_path)
    with pytest.raises(RAdapterError, match=r"--method 'r-adapter' -> 'drm'.*method cannot change on resume"):
        run(_cfg(train_folder, out, resume=True, resume_allow_changes=True, method="drm"))


# ------------------------------------------------------------------ unreadable checkpoints


def _checkpoint_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)


def test_a_run_keeps_one_previous_checkpoint(train_folder, finished, tmp_path):
    out = finished[0]
    assert _checkpoint_files(out) == ["checkpoint.prev.pt", "checkpoint.pt"]
    assert _checkpoint(out / "checkpoint.pt")["step"] == 6 and _checkpoint(out / "checkpoint.prev.pt")["step"] == 3
    again = _copy(finished, tmp_path)  # a fresh run in that folder drops the earlier run's checkpoints,
    (again / ".checkpoint.pt.k1ll3d0n.tmp").write_bytes(b"half")  # and what a killed write left
    run(_cfg(train_folder, again, ckpt_every=100))
    assert _checkpoint_files(again) == ["checkpoint.pt"] and _checkpoint(again / "checkpoint.pt")["step"] == 6


def test_truncated_checkpoint_resumes_from_the_previous_one(train_folder, finished, tmp_path, caplog):
    out = _copy(finished, tmp_path)
    latest = out / "checkpoint.pt"
    straight = _checkpoint(latest)["model"]
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="train"):
        m = run(_cfg(train_folder, out, resume=True))
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warned) == 1 and f"{latest} is unreadable" in warned[0]
    assert f"resuming from {out / 'checkpoint.prev.pt'} (step 3)" in warned[0]
    assert m["training"]["steps"] == 6
    resumed = _checkpoint(latest)["model"]
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert _checkpoint(out / "checkpoint.prev.pt")["step"] == 3  # the unreadable file was not kept


def test_no_readable_checkpoint_is_a_one_line_error(train_folder, finished, tmp_path):
    out = _copy(finished, tmp_path)
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:1000])
    (out / "checkpoint.prev.pt").write_bytes(b"")
    args = ["--model", radapter.TINY_MODEL, "--benchmark", "", "--train-folder", str(train_folder), "--batch-size",
            "8", "--steps", "6", "--warmup-steps", "2", "--ckpt-every", "3", "--out-dir", str(out), "--resume"]
    proc = subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert f"{out / 'checkpoint.pt'} is unreadable" in errors[0] and f"{out / 'checkpoint.prev.pt'}" in errors[0]


# ------------------------------------------------------------------ final loss


def test_resume_after_the_last_step_reports_the_final_loss(train_folder, finished, tmp_path):
    out = _copy(finished, tmp_path)  # as if killed after the last checkpoint, before the outputs
    loss = finished[1]["training"]["final_loss"]
    assert isinstance(loss, float) and np.isfinite(loss)
    m = run(_cfg(train_folder, out, resume=True))
    assert m["training"]["final_loss"] == loss and "final_loss_note" not in m["training"]
    assert _strict_json(out / "metrics.json")["training"]["final_loss"] == loss
    assert radapter.adapter_file_info(out / "adapter.safetensors")["training"]["final_loss"] == loss


def test_resume_after_the_last_step_without_a_recorded_loss_reports_null(train_folder, finished, tmp_path):
    out = _copy(finished, tmp_path)
    state = _checkpoint(out / "checkpoint.pt")
    state.pop("loss", None)  # a checkpoint that does not record the loss
    torch.save(state, out / "checkpoint.pt")
    m = run(_cfg(train_folder, out, resume=True))
    training = _strict_json(out / "metrics.json")["training"]
    assert m["training"]["final_loss"] is None and training["final_loss"] is None
    assert "does not record" in training["final_loss_note"]
    meta = radapter.adapter_file_info(out / "adapter.safetensors")["training"]
    assert meta["final_loss"] is None and "does not record" in meta["final_loss_note"]


def test_a_loss_that_is_not_finite_is_reported_as_null():
    from train.loop import final_loss

    assert final_loss(1.5, resumed=True) == {"final_loss": 1.5}
    nan = final_loss(float("nan"), resumed=False)
    assert nan["final_loss"] is None and "not finite" in nan["final_loss_note"]
