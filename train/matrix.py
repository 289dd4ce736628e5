"""``python -m train.matrix``: the results matrix (benchmarks x methods x seeds) as parallel training runs.

Every run is one ``python -m train`` process writing ``<out>/<group>/<method>/seed<k>/``; several
run at once (``--jobs``), on one GPU or the CPU. A run whose ``metrics.json`` exists is skipped
and an unfinished one continues from its checkpoint (``--resume``), so a stopped matrix
resumes where it was. Every method of a group gets the same data, steps, batch and evaluation.

    python -m train.matrix --jobs 12                                   # everything, on a GPU
    python -m train.matrix --groups emoji --methods zero-shot r-adapter --steps 2 --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import METHODS

CLASSIFICATION = ("zero-shot", "linear-probe", "full-ft", "lora", "r-adapter", "drm", "full-ft-drm")
REPO = Path(__file__).resolve().parent.parent
MATRIX_FILE = "matrix.json"
RUN_FILE = "matrix_run.json"


@dataclass(frozen=True)
class Group:
    """A benchmark setting: where its runs go, what they train on, which methods run."""

    name: str
    benchmark: str
    methods: tuple[str, ...]
    args: tuple[str, ...] = ()
    cost: float = 1.0  # relative wall time, for scheduling the longest runs first
    headline: bool = False  # the results table's main rows: every seed (others: --extra-seeds)
    sweep: bool = False  # always evaluate the test split at every alpha (a shipped adapter's plot)


GROUPS = (
    Group("emoji", "emoji", CLASSIFICATION, headline=True),
    # The spurious-correlation benchmark: where the zero-shot model is the robust one.
    Group("emoji-backgrounds", "emoji-backgrounds", CLASSIFICATION, cost=1.2, headline=True),
    Group("fmnist", "fmnist", CLASSIFICATION, cost=2.5, headline=True),
    Group("emoji-retrieval", "emoji", ("zero-shot", "r-adapter"), ("--task", "retrieval"), sweep=True),
    Group("emoji-base2novel", "emoji", ("zero-shot", "full-ft", "r-adapter"), ("--base-to-novel",)),
    Group("fmnist-base2novel", "fmnist", ("zero-shot", "full-ft", "r-adapter"), ("--base-to-novel",), cost=3.0),
)
METHOD_COST = {"zero-shot": 0.3, "linear-probe": 0.6, "lora": 0.8, "r-adapter": 1.0, "full-ft": 1.0, "drm": 1.1,
               "full-ft-drm": 1.1}
# Full fine-tuning moves every weight: it takes the small learning rate of FLYP / WiSE-FT, not the adapters' 5e-4.
DEFAULT_LR = {"full-ft": 3e-5, "full-ft-drm": 3e-5}
BASE_LR = 5e-4  # python -m train's default: adapters, DRM adapters and LoRA
TRAINED = ("full-ft", "full-ft-drm", "lora", "r-adapter", "drm")
SEARCH_DIR = "lr-search"
DEFAULT_TRAIN_LIMIT = {"fmnist": 10000}
DEFAULT_EVAL_LIMIT = {"emoji": 500, "fmnist": 500}


@dataclass(frozen=True)
class Run:
    """One cell of the matrix, or (``search``) one learning rate tried for a method."""

    group: Group
    method: str
    seed: int
    lr: float | None = None  # None: the settings' rate for the method
    search: bool = False

    @property
    def key(self) -> str:
        if self.search:
            return f"{SEARCH_DIR}/{self.group.name}/{self.method}/lr{self.lr:g}/seed{self.seed}"
        return f"{self.group.name}/{self.method}/seed{self.seed}"

    def out_dir(self, root: Path) -> Path:
        return root / self.key


@dataclass
class Settings:
    """The budget and evaluation every run shares (per-benchmark maps: benchmark -> value)."""

    steps: int = 300
    batch_size: int = 32
    warmup_steps: int | None = None  # default: steps // 10
    eval_alphas: int = 6
    test_sweep: bool = True  # False: test split at the chosen alpha and 1 only (validation still sweeps)
    eval_limit: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_EVAL_LIMIT))
    train_limit: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_TRAIN_LIMIT))
    lr: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LR))
    device: str = "auto"
    precision: str = "fp32"
    workers: int = 1
    model: str | None = None
    train_args: tuple[str, ...] = ()

    def train_argv(self, run: Run, out: Path) -> list[str]:
        """The ``python -m train`` arguments of one run."""
        bench = run.group.benchmark
        argv = ["--method", run.method, "--benchmark", bench, *run.group.args, "--seed", str(run.seed),
                "--out-dir", str(out), "--steps", str(self.steps), "--batch-size", str(self.batch_size),
                "--warmup-steps", str(self.warmup_steps if self.warmup_steps is not None else self.steps // 10),
                "--eval-alphas", str(self.eval_alphas), "--ckpt-every", str(max(1, self.steps // 2)),
                "--log-every", str(max(1, self.steps // 10)), "--device", self.device,
                "--precision", self.precision, "--workers", str(self.workers), "--resume"]
        if bench in self.eval_limit:
            argv += ["--eval-limit", str(self.eval_limit[bench])]
        if bench in self.train_limit:
            argv += ["--train-limit", str(self.train_limit[bench])]
        lr = run.lr if run.lr is not None else self.lr.get(run.method)
        if lr is not None:
            argv += ["--lr", repr(lr)]
        if run.search:  # scored by ID validation at the end of training, the same way for every method
            argv += ["--val-every", str(self.steps)]
        if not (self.test_sweep or run.group.sweep):
            argv.append("--no-test-sweep")
        if self.model:
            argv += ["--model", self.model]
        return argv + list(self.train_args)

    def seed_matters(self, run_group: Group, method: str) -> bool:
        """Zero-shot is deterministic; the linear probe too unless its training subset depends on the seed."""
        if method == "zero-shot":
            return False
        if method == "linear-probe":
            return run_group.benchmark in self.train_limit
        return True


def plan(settings: Settings, seeds: list[int], groups: list[str] | None = None,
         methods: list[str] | None = None, extra_seeds: list[int] | None = None) -> list[Run]:
    """Every run of the matrix, longest first.

    Headline groups run every seed, the others ``extra_seeds`` (default: the first seed);
    deterministic methods run once, with the first seed.
    """
    runs = []
    for g in GROUPS:
        if groups and g.name not in groups:
            continue
        group_seeds = seeds if g.headline else (extra_seeds or seeds[:1])
        for m in g.methods:
            if methods and m not in methods:
                continue
            for s in group_seeds if settings.seed_matters(g, m) else group_seeds[:1]:
                runs.append(Run(g, m, s))
    return sorted(runs, key=lambda r: -r.group.cost * METHOD_COST[r.method])


def method_lr(settings: Settings, method: str) -> float:
    return settings.lr.get(method, BASE_LR)


def search_plan(settings: Settings, multipliers: list[float], seed: int, groups: list[str] | None = None,
                methods: list[str] | None = None) -> list[Run]:
    """The learning-rate search: every trained method of the chosen groups at its usual rate times each
    multiplier, one seed; the same number of runs for every method (the same search budget)."""
    runs = [Run(g, m, seed, lr=float(f"{method_lr(settings, m) * k:.3g}"), search=True)
            for g in GROUPS if not groups or g.name in groups
            for m in g.methods if m in TRAINED and (not methods or m in methods) for k in multipliers]
    return sorted(runs, key=lambda r: -r.group.cost * METHOD_COST[r.method])


def run_metrics(run: Run, root: Path) -> dict[str, Any]:
    """A finished run's ``metrics.json`` (empty if it has not finished)."""
    path = run.out_dir(root) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def search_score(run: Run, root: Path) -> float | None:
    """A search run's ID validation top-1 at alpha 1 after training (``None`` if it has none)."""
    curve = run_metrics(run, root).get("training", {}).get("val_curve") or []
    return curve[-1]["top1"] if curve else None


def choose_lrs(runs: list[Run], root: Path, settings: Settings) -> dict[str, dict[str, dict[str, Any]]]:
    """``group -> method -> {"tried": {lr: score}, "chosen": lr}``: the best rate on ID validation (on a
    tie, the usual rate, else the smaller); a method whose runs all failed keeps its usual rate."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        entry = out.setdefault(run.group.name, {}).setdefault(run.method, {"tried": {}})
        entry["tried"][repr(run.lr)] = search_score(run, root)
    for group in out.values():
        for method, entry in group.items():
            usual = method_lr(settings, method)
            scored = [(s, float(lr)) for lr, s in entry["tried"].items() if s is not None]
            entry["usual"] = usual
            entry["chosen"] = max(scored, key=lambda t: (t[0], t[1] == usual, -t[1]))[1] if scored else usual
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_done(run: Run, root: Path) -> bool:
    return (run.out_dir(root) / "metrics.json").is_file()


def machine_info() -> dict[str, Any]:
    """Where the matrix ran: host, CPU count, Python, torch and the accelerator."""
    info: dict[str, Any] = {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
                            "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info


def model_info(model: str | None) -> dict[str, Any]:
    """Name, fingerprint and embedding width of the model the runs load."""
    import torch

    import radapter
    from radapter import compute_fingerprint
    from radapter.models import model_info as loaded_info

    m, _, tokenizer = radapter.load_model(model) if model else radapter.load_model()
    info = loaded_info(m)
    with torch.no_grad():
        width = int(m.encode_text(tokenizer(["a photo."])).shape[-1])
    return {"name": info.name if info else model, "fingerprint": compute_fingerprint(m), "embed_dim": width}


def run_env(threads: int) -> dict[str, str]:
    """Each run's environment: a few CPU threads (many runs share the machine), the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def execute(run: Run, root: Path, settings: Settings, *, python: str, env: dict[str, str],
            deadline: float | None) -> dict[str, Any]:
    """Run one cell as a subprocess (log in ``run.log``); kill its process group at ``deadline``."""
    out = run.out_dir(root)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "train", *settings.train_argv(run, out)]
    start = time.time()
    with open(out / "run.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=None if deadline is None else max(1.0, deadline - time.time()))
            status = "done" if code == 0 and (out / "metrics.json").is_file() else "failed"
        except subprocess.TimeoutExpired:
            _kill(proc)
            code, status = None, "stopped"
    record = {"run": run.key, "status": status, "returncode": code, "wall_s": round(time.time() - start, 1),
              "command": shlex.join(["python", "-m", "train", *cmd[3:]]),
              "finished": _now()}
    (out / RUN_FILE).write_text(json.dumps(record, indent=1))
    return record


def _kill(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def run_matrix(runs: list[Run], root: Path, settings: Settings, *, jobs: int, threads: int = 1,
               python: str | None = None, time_limit: float | None = None,
               keep_checkpoints: bool = False) -> dict[str, Any]:
    """Run what is not done yet, ``jobs`` at a time; returns counts and per-run records."""
    python = python or sys.executable
    todo = [r for r in runs if not is_done(r, root)]
    deadline = None if time_limit is None else time.time() + time_limit
    env, lock, records = run_env(threads), threading.Lock(), []
    print(f"matrix: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run, {jobs} at a time",
          flush=True)

    def one(run: Run) -> None:
        if deadline is not None and time.time() >= deadline:
            rec = {"run": run.key, "status": "not started"}
        else:
            rec = execute(run, root, settings, python=python, env=env, deadline=deadline)
            if rec["status"] == "done" and not keep_checkpoints:
                for name in ("checkpoint.pt", "checkpoint.prev.pt"):
                    (run.out_dir(root) / name).unlink(missing_ok=True)
        with lock:
            records.append(rec)
            if rec["status"] != "not started":
                print(f"[{len(records)}/{len(todo)}] {rec['run']}: {rec['status']}"
                      + (f" in {rec['wall_s']} s" if "wall_s" in rec else ""), flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, todo))
    counts = {s: sum(r["status"] == s for r in records) for s in ("done", "failed", "stopped", "not started")}
    return {"planned": len(runs), "skipped": len(runs) - len(todo), **counts, "records": records}


def _key_map(values: list[str] | None, default: dict[str, Any], kind: type, keys: tuple[str, ...]) -> dict[str, Any]:
    """``["fmnist=500", "emoji=200"]``, ``["300"]`` (every key) or ``["none"]`` (empty) -> a map."""
    if values is None:
        return dict(default)
    out: dict[str, Any] = {}
    for v in values:
        if v.lower() == "none":
            continue
        if "=" in v:
            k, _, val = v.partition("=")
            out[k] = kind(val)
        else:
            out.update(dict.fromkeys(keys, kind(v)))
    unknown = sorted(set(out) - set(keys))
    if unknown:
        raise ValueError(f"unknown names {unknown}; choose from {list(keys)}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.matrix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    s = Settings()
    p.add_argument("--out", default="runs/matrix", help="matrix root (default: runs/matrix)")
    p.add_argument("--groups", nargs="+", choices=[g.name for g in GROUPS], help="default: all")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="default: each group's methods")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="headline groups' seeds (default: 0 1 2)")
    p.add_argument("--extra-seeds", nargs="+", type=int, default=None,
                   help="seeds of the retrieval and base-to-novel groups (default: the first of --seeds)")
    p.add_argument("--steps", type=int, default=s.steps, help=f"optimiser steps per run (default: {s.steps})")
    p.add_argument("--batch-size", type=int, default=s.batch_size, help=f"default: {s.batch_size}")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: steps // 10")
    p.add_argument("--eval-alphas", type=int, default=s.eval_alphas,
                   help=f"alpha grid points (default: {s.eval_alphas})")
    p.add_argument("--test-sweep", action=argparse.BooleanOptionalAction, default=s.test_sweep,
                   help="test split at every alpha (default); --no-test-sweep: only at the alpha chosen on "
                        "validation and at 1, about a third of the evaluation time (retrieval always sweeps)")
    p.add_argument("--eval-limit", nargs="+", default=None, metavar="[BENCH=]N",
                   help=f"images per evaluation set (default: {DEFAULT_EVAL_LIMIT}; 'none': all)")
    p.add_argument("--train-limit", nargs="+", default=None, metavar="[BENCH=]N",
                   help=f"training images, a fixed subset per seed (default: {DEFAULT_TRAIN_LIMIT}; 'none': all)")
    p.add_argument("--lr", nargs="+", default=None, metavar="METHOD=LR",
                   help=f"learning rate per method (default: {DEFAULT_LR}; others: train's 5e-4)")
    p.add_argument("--lr-search", nargs="+", type=float, default=None, metavar="MULT",
                   help="first try each trained method at its usual learning rate times each MULT (e.g. 0.5 1 2), "
                        "one seed, and train every seed at the rate with the best ID validation top-1 "
                        f"(runs in <out>/{SEARCH_DIR}/; the same number of tries for every method)")
    p.add_argument("--device", default=s.device, help="auto, cpu, cuda (default: auto)")
    p.add_argument("--precision", default=s.precision, choices=("fp32", "bf16", "fp16"))
    p.add_argument("--workers", type=int, default=s.workers, help="DataLoader workers per run (default: 1)")
    p.add_argument("--model", default=None, help="model name or path (default: the offline default model)")
    p.add_argument("--train-args", default="", help="more `python -m train` flags for every run, one string")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: 3/4 of the CPUs, at most 10)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (default: 1)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: start nothing after it and stop running runs (they resume next time)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep checkpoint.pt (and checkpoint.prev.pt) of finished runs")
    p.add_argument("--expect-fingerprint", default=None, help="refuse to run unless the model has this fingerprint")
    p.add_argument("--no-fingerprint", action="store_true", help="do not load the model to record its fingerprint")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their commands, run nothing")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    benches = tuple(dict.fromkeys(g.benchmark for g in GROUPS))
    return Settings(steps=args.steps, batch_size=args.batch_size, warmup_steps=args.warmup_steps,
                    eval_alphas=args.eval_alphas, test_sweep=args.test_sweep,
                    eval_limit=_key_map(args.eval_limit, DEFAULT_EVAL_LIMIT, int, benches),
                    train_limit=_key_map(args.train_limit, DEFAULT_TRAIN_LIMIT, int, benches),
                    lr=_key_map(args.lr, DEFAULT_LR, float, METHODS), device=args.device,
                    precision=args.precision, workers=args.workers, model=args.model,
                    train_args=tuple(shlex.split(args.train_args)))


def _trained_lr(run: Run, root: Path) -> float | None:
    """The learning rate a finished run's saved config holds (``None`` if it holds none)."""
    lr = run_metrics(run, root).get("config", {}).get("lr")
    return None if lr is None else float(lr)


def _record_invocation(root: Path, entry: dict[str, Any]) -> None:
    path = root / MATRIX_FILE
    data = json.loads(path.read_text()) if path.is_file() else {"invocations": []}
    data["invocations"].append(entry)
    data.update({k: entry[k] for k in ("settings", "model", "seeds", "extra_seeds", "lr_search") if k in entry})
    path.write_text(json.dumps(data, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root = Path(args.out)
    runs = plan(settings, args.seeds, args.groups, args.methods, args.extra_seeds)
    search = search_plan(settings, args.lr_search, args.seeds[0], args.groups, args.methods) if args.lr_search else []
    if args.dry_run:
        for r in [*search, *runs]:
            mark = "done" if is_done(r, root) else "todo"
            lr = "  (at the rate the search chooses)" if search and not r.search and r.method in TRAINED else ""
            print(f"{mark}  {r.key}  python -m train {shlex.join(settings.train_argv(r, r.out_dir(root)))}{lr}")
        return 0
    jobs = args.jobs or max(1, min(10, (os.cpu_count() or 1) * 3 // 4))
    started = time.time()
    entry: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "train.matrix", *(sys.argv[1:] if argv is None else argv)]),
        "started": _now(), "machine": machine_info(), "jobs": jobs,
        "threads": args.threads, "seeds": args.seeds, "extra_seeds": args.extra_seeds or args.seeds[:1],
        "settings": asdict(settings)}
    if not args.no_fingerprint:
        entry["model"] = model_info(settings.model)
        print(f"model {entry['model']['name']} fingerprint {entry['model']['fingerprint'][:16]}", flush=True)
        if args.expect_fingerprint and entry["model"]["fingerprint"] != args.expect_fingerprint:
            print(f"error: model fingerprint {entry['model']['fingerprint']} is not the expected "
                  f"{args.expect_fingerprint}: the towers or the head differ from the expected model",
                  file=sys.stderr)
            return 2
    root.mkdir(parents=True, exist_ok=True)
    if search:
        found = run_matrix(search, root, settings, jobs=jobs, threads=args.threads, time_limit=args.time_limit,
                           keep_checkpoints=args.keep_checkpoints)
        chosen = choose_lrs(search, root, settings)
        entry["lr_search"] = {"multipliers": args.lr_search, "seed": args.seeds[0], "groups": chosen}
        if found["stopped"] or found["not started"]:
            entry.update(wall_s=round(time.time() - started, 1), finished=_now(), runs={"done": found["done"]})
            _record_invocation(root, entry)
            print("matrix: the learning-rate search did not finish; run the same command again", flush=True)
            return 1
        for group, methods in chosen.items():
            for method, c in methods.items():
                tried = ", ".join(f"{float(lr):g}: {'failed' if s is None else f'{100 * s:.1f}'}"
                                  for lr, s in c["tried"].items())
                print(f"{group}/{method}: lr {c['chosen']:g} (ID val top-1 {tried})", flush=True)
        runs = [Run(r.group, r.method, r.seed, lr=chosen[r.group.name][r.method]["chosen"])
                if r.method in chosen.get(r.group.name, {}) else r for r in runs]
        stale = [r.key for r in runs if r.lr is not None and is_done(r, root) and _trained_lr(r, root) not in
                 (None, r.lr)]
        if stale:
            print(f"error: {', '.join(stale)} finished at another learning rate than the search chose; "
                  "move them away or use another --out", file=sys.stderr)
            return 2
    summary = run_matrix(runs, root, settings, jobs=jobs, threads=args.threads, time_limit=args.time_limit,
                         keep_checkpoints=args.keep_checkpoints)
    entry.update(wall_s=round(time.time() - started, 1), finished=_now(),
                 runs={k: v for k, v in summary.items() if k != "records"},
                 failed=[r["run"] for r in summary["records"] if r["status"] == "failed"])
    _record_invocation(root, entry)
    print(f"matrix: {summary['done']} done, {summary['skipped']} skipped, {summary['failed']} failed, "
          f"{summary['stopped'] + summary['not started']} left for later, in {entry['wall_s']} s", flush=True)
    for name in entry["failed"]:
        print(f"failed: {name} (log: {root / name / 'run.log'})", file=sys.stderr)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
