"""Start-up: ``import radapter``, every command line's ``--help``, and the app's first answer.

    python -m benchmarks.startup                  # writes docs/bench/startup.json

Each figure is the median of ``--runs`` fresh processes (wall time from spawn to exit, or
to the first answer):

- ``python_s``: ``python -c pass``, the interpreter alone (the floor of every other figure);
- ``import_radapter_s``: ``python -c "import radapter"``; ``import_torch_s`` for scale;
- ``help_s``: ``python -m X --help`` for each command line (console scripts run the same code);
- ``app_first_answer_s``: ``python -m app`` (the README's command 1, offline default model and
  shipped adapters) until it answers its first request (the page); ``app_first_classify_s``:
  until its HTTP API has answered one Classify request on a photo, sent through
  ``gradio_client`` as soon as the page answers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import start_app, write_result

ROOT = Path(__file__).resolve().parents[1]

#: Every ``python -m`` entry point users are told about, subcommands with their own parser included.
HELP_COMMANDS = (
    "radapter", "radapter eval", "radapter segment", "radapter export", "radapter.data.prepare",
    "train", "train.matrix", "train.ship", "train.describe", "train.report",
    "indexes", "indexes build", "indexes eval", "indexes search", "indexes.build", "indexes.evaluate",
    "app",
)
GOALS = {"help_s": "<= 1 each", "import_radapter_s": "<= 1.5", "app_first_answer_s": "<= 8"}


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def process_time(args: list[str]) -> float:
    """Wall time of one fresh process from spawn to exit (it must succeed)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _photo(tmp: Path) -> Path:
    import numpy as np
    from PIL import Image
    from skimage import data

    path = tmp / "chelsea.png"
    Image.fromarray(np.asarray(data.chelsea())).save(path)
    return path


def app_first_answer(photo: Path, timeout: float = 180.0) -> tuple[float, float, str]:
    """Seconds from spawning ``python -m app`` to its first page and to its first Classify answer,
    and that answer's note."""
    from gradio_client import Client, handle_file

    t0 = time.perf_counter()
    proc, url, page = start_app(timeout=timeout)
    try:
        client = Client(url, verbose=False)
        info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/classify"]
        adapter = info["parameters"][2]["parameter_default"]
        out = client.predict(handle_file(str(photo)), "cat, dog, car", adapter, 0.5, 0.5, api_name="/classify")
        return page, time.perf_counter() - t0, str(out[-1])[:200]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="fresh processes per figure (the median is reported)")
    p.add_argument("--out", default="docs/bench/startup.json")
    p.add_argument("--no-app", action="store_true", help="skip the app's first answer")
    args = p.parse_args()
    load_before = os.getloadavg()[0]

    def median(cmd: list[str]) -> float:
        return statistics.median(process_time(cmd) for _ in range(args.runs))

    result: dict = {"runs": args.runs, "python_s": median(["-c", "pass"]),
                    "import_torch_s": median(["-c", "import torch"]),
                    "import_radapter_s": median(["-c", "import radapter"])}
    result["help_s"] = {cmd: median(["-m", *cmd.split(), "--help"]) for cmd in HELP_COMMANDS}
    result["help_max_s"] = max(result["help_s"].values())
    if not args.no_app:
        with tempfile.TemporaryDirectory() as tmp:
            photo = _photo(Path(tmp))
            answers = [app_first_answer(photo) for _ in range(args.runs)]
        result["app_first_answer_s"] = statistics.median(a[0] for a in answers)
        result["app_first_classify_s"] = statistics.median(a[1] for a in answers)
        result["app_runs_s"] = [[round(a[0], 2), round(a[1], 2)] for a in answers]
        result["app_classify_note"] = answers[0][2]
    met = {"help_s": result["help_max_s"] <= 1.0, "import_radapter_s": result["import_radapter_s"] <= 1.5}
    if "app_first_answer_s" in result:
        met["app_first_answer_s"] = result["app_first_answer_s"] <= 8.0
    result.update(goals=GOALS, goals_met=met, load_average_before_after=[load_before, os.getloadavg()[0]])
    write_result(args.out, result, "benchmarks.startup")


if __name__ == "__main__":
    main()
