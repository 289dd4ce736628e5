"""Copy a training run's adapter into the app's adapter folder, with its alpha sweep.

    python -m train.ship runs/emoji adapters/emoji-categories

writes ``adapters/emoji-categories.safetensors`` and ``adapters/emoji-categories.sweep.json``
(the test-split ID / OOD score at each alpha the run evaluated: top-1 and, on a benchmark with
groups, worst-group top-1, or mean R@1 for a retrieval run; the app plots it with the current alpha).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from radapter.atomic import atomic_path
from radapter.errors import RAdapterError


def _mean_r1(scores: dict[str, float]) -> float:
    return (scores["i2t_r1"] + scores["t2i_r1"]) / 2


def sweep_of(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The test-split score at each alpha the run evaluated: top-1 (classification) or mean R@1 (retrieval)."""
    results = metrics.get("results", {})
    head = {"benchmark": metrics["config"].get("benchmark"), "split": "test",
            "chosen_alpha": results.get("chosen_alpha"), "method": metrics.get("method")}
    part = results.get("all") or results.get("base") or {}
    if part.get("sweep"):
        keys = ("top1", "worst_group") if all("worst_group" in p["id"] for p in part["sweep"]) else ("top1",)
        return {**head, "points": [{"alpha": p["alpha"], "id": {k: p["id"][k] for k in keys},
                                    "ood_avg": {k: p["ood_avg"].get(k) for k in keys}} for p in part["sweep"]]}
    tested = [p for p in results.get("points", []) if "id" in p]
    if tested:
        return {**head, "key": "r1", "metric": "R@1, mean of both directions",
                "points": [{"alpha": p["alpha"], "id": {"r1": _mean_r1(p["id"])}, "ood_avg": {"r1": _mean_r1(p["ood"])}}
                           for p in sorted(tested, key=lambda p: p["alpha"])]}
    return None


def ship(run_dir: str | Path, target: str | Path) -> tuple[Path, Path | None]:
    run_dir, target = Path(run_dir), Path(target)
    adapter = run_dir / "adapter.safetensors"
    if not adapter.is_file():
        raise RAdapterError(f"{run_dir} has no adapter.safetensors (was it an adapter method?)")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out_adapter = target.with_suffix(".safetensors")
    with atomic_path(out_adapter) as tmp:
        shutil.copyfile(adapter, tmp)
    sweep = sweep_of(metrics)
    sweep_path = None
    if sweep:
        sweep_path = target.with_suffix(".sweep.json")
        with atomic_path(sweep_path) as tmp:
            tmp.write_text(json.dumps(sweep, indent=1))
    return out_adapter, sweep_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("target", help="adapters/NAME (suffixes are added)")
    args = p.parse_args(argv)
    try:
        for path in ship(args.run_dir, args.target):
            if path:
                print(f"wrote {path}")
    except (RAdapterError, OSError, json.JSONDecodeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
