"""App latency: cold start, and a classification right after an alpha change vs a plain one.

    python -m benchmarks.app_bench                 # writes docs/bench/app.json

- ``cold_start_s``: a fresh ``python -m app`` process until its HTTP port answers (the
  model built, the adapters found; retrieval indexes build later, in the background).
- ``slider_over_plain``: the median time of "re-merge at a new alpha + classify one image"
  over the median time of "classify one image" at an alpha already merged, on the default
  model with the first shipped adapter (both with the class head cached, as in the app).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.common import write_result

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cold_start(timeout: float = 120.0) -> float:
    port = _free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), "--collection", "emoji:google-test"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        while time.perf_counter() - t0 < timeout:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the app did not answer in time")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def slider_latency(reps: int) -> dict:
    """Plain: forward + cached head on the model as merged. After a slider release: the app's
    full request at an alpha never seen before (re-merge, a new zero-shot head, forward)."""
    import torch
    from PIL import Image

    from app.service import ModelService

    service = ModelService.from_config(adapter_dir=ROOT / "adapters")
    if not service.adapters:
        raise RuntimeError("no shipped adapters in adapters/")
    adapter = next(iter(service.adapters))
    image = (np.random.default_rng(0).random((224, 224, 3)) * 255).astype(np.uint8)
    classes = ["cat", "dog", "car", "flag", "apple"]
    x = service.preprocess(Image.fromarray(image)).unsqueeze(0)
    service.probabilities(image, classes, adapter, 0.5)
    model = service._slot(adapter).model  # merged at 0.5 by the call above
    head = next(iter(service._heads.values()))
    plain, slider = [], []
    for i in range(reps):
        t0 = time.perf_counter()
        with torch.no_grad():
            torch.softmax(head(model.encode_image(x)), dim=1)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        service.probabilities(image, classes, adapter, round(0.01 + 0.97 * i / reps, 4))  # a new alpha each time
        slider.append(time.perf_counter() - t0)
        service.probabilities(image, classes, adapter, 0.5)  # back to the plain model's alpha
    return {"adapter": adapter, "plain_s": statistics.median(plain), "after_alpha_change_s": statistics.median(slider)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default="docs/bench/app.json")
    args = p.parse_args()
    start = cold_start()
    lat = slider_latency(args.reps)
    write_result(args.out, {"cold_start_s": start, "slider_over_plain": lat["after_alpha_change_s"] / lat["plain_s"],
                            **lat, "goals": {"cold_start_s": "<= 20", "slider_over_plain": "<= 1.2"}},
                 "benchmarks.app_bench")


if __name__ == "__main__":
    main()
