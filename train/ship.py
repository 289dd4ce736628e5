"""Copy a training run's adapter into the app's adapter folder, with its alpha sweep.

    python -m train.ship runs/emoji adapters/emoji-categories

writes ``adapters/emoji-categories.safetensors`` and ``adapters/emoji-categories.sweep.json``
(the test-split ID / OOD accuracy at each alpha, which the app plots with the current alpha).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from radapter.atomic import atomic_path
from radapter.errors import RAdapterError


def ship(run_dir: str | Path, target: str | Path) -> tuple[Path, Path | None]:
    run_dir, target = Path(run_dir), Path(target)
    adapter = run_dir / "adapter.safetensors"
    if not adapter.is_file():
        raise RAdapterError(f"{run_dir} has no adapter.safetensors (was it an adapter method?)")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    results = metrics.get("results", {})
    part = results.get("all") or results.get("base") or {}
    out_adapter = target.with_suffix(".safetensors")
    with atomic_path(out_adapter) as tmp:
        shutil.copyfile(adapter, tmp)
    sweep_path = None
    if part.get("sweep"):
        sweep = {"benchmark": metrics["config"].get("benchmark"), "split": "test",
                 "chosen_alpha": results.get("chosen_alpha"), "method": metrics.get("method"),
                 "points": [{"alpha": p["alpha"], "id": {"top1": p["id"]["top1"]},
                             "ood_avg": {"top1": p["ood_avg"].get("top1")}} for p in part["sweep"]]}
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
