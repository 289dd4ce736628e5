"""App latency: cold start, and a classification right after an alpha change vs a plain one.

    python -m benchmarks.app_bench                 # writes docs/bench/app.json

- ``cold_start_s``: a fresh ``python -m app`` process until its HTTP port answers (the
  model built, the adapters found; retrieval indexes build later, in the background).
- ``slider_over_plain``: the median time of the UI's slider-release handler (``/set_alpha``:
  re-merge at the new alpha and refresh the classification of the image on screen) over
  the median time of a plain prediction (one new, already decoded image at the alpha
  already merged, its class head cached), on the default model with the first shipped
  adapter. The release comes after the user has looked at the previous result: the heads
  the app warms in the background after a classification are ready.
- ``slider_cold_over_plain``: the same release right after classifying with a class list
  never seen, to the alpha the warmer would reach last (the head is built on demand).
- ``heads_ready_s``: how long the warmer takes to cover every slider alpha for one class list.
- ``visitors``: ``python -m app`` (a process of its own, as served) driven through its HTTP API by
  ``gradio_client``: first one visitor alone, then ``--visitors`` at once, each with its own
  session, adapter and alpha, each asking in turn to classify a photo, search images by text and
  segment a photo. Per endpoint: p50 and p95 latency (``one`` and ``many``), ``p95_over_one_p50``
  (goal <= 4), requests per second, errors, and answers whose note does not state the visitor's
  own alpha (goal: 0 of both). Retrieval indexes are built (every adapter's alpha grid) before
  anything is timed; they are cached in ``--index-dir``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import start_app, write_result

ROOT = Path(__file__).resolve().parents[1]


def cold_start(timeout: float = 120.0) -> float:
    proc, _, seconds = start_app(["--collection", "emoji:google-test"], timeout)
    proc.terminate()
    proc.wait(timeout=30)
    return seconds


def slider_latency(reps: int) -> dict:
    """Slider release vs plain prediction on the default model with the first shipped adapter.

    Drives the functions the UI registers (``/classify`` and ``/set_alpha``), called with
    what Gradio hands them (the uploaded file's path), minus HTTP and the queue, with the
    image on screen already classified, as a user who classifies and then moves the slider.
    Every release goes to a slider alpha the model is not merged at and that image has not
    been classified at. ``previous_path_s`` is what the app did per new alpha before the
    head warmer (``merge_adapters`` + ``zero_shot_classifier`` + forward), for reference.
    """
    import copy

    import torch
    from PIL import Image

    import radapter
    from app.examples import Examples
    from app.heads import ALPHA_GRID
    from app.service import DEFAULT_TEMPLATES, ModelService, as_rgb_array
    from app.ui import build_ui

    service = ModelService.from_config(adapter_dir=ROOT / "adapters")
    if not service.adapters:
        raise RuntimeError("no shipped adapters in adapters/")
    adapter = next(iter(service.adapters))
    tmp = Path(tempfile.mkdtemp(prefix="app-bench-"))
    demo = build_ui(service, None, Examples(tmp / "examples", data=tmp / "no-data"))
    fns = {f.api_name: f.fn for f in demo.fns.values() if isinstance(f.api_name, str)}
    classify, release = fns["classify"], fns["set_alpha"]
    rng = np.random.default_rng(0)
    count = iter(range(10**6))

    def upload() -> str:
        """A new 224 x 224 photo-sized upload, as Gradio stores it."""
        path = tmp / f"upload-{next(count)}.png"
        Image.fromarray((rng.random((224, 224, 3)) * 255).astype(np.uint8)).save(path)
        return str(path)

    classes = "cat, dog, car, flag, apple"
    names = classes.split(", ")
    alpha = 0.5
    classify(upload(), classes, adapter, alpha, 0.5)
    t0 = time.perf_counter()
    service.wait_for_heads()
    heads_ready = time.perf_counter() - t0  # the first class list's heads at every slider alpha
    # Alphas to release at: each differs from the one before, cycling through the grid; not 0 or 1,
    # where the merged column would be the (cached) zero-shot or fine-tuned one.
    targets = [a for a in ALPHA_GRID if a not in (0.0, 1.0, alpha)]
    plain, warm, cold, previous = [], [], [], []
    reference = copy.deepcopy(service.base_model)
    radapter.load_adapters(reference, service.adapters[adapter].path)
    for i in range(reps):
        shown = upload()
        classify(shown, classes, adapter, alpha, 0.5)  # the user's image, classified at the current alpha
        service.wait_for_heads()  # the user looks at the result before moving the slider
        new = as_rgb_array(upload())  # decoded outside the timing: plain is the model's prediction alone
        t0 = time.perf_counter()
        service.probabilities(new, names, adapter, alpha)  # plain: a new image at the merged alpha, head cached
        plain.append(time.perf_counter() - t0)
        alpha = targets[i % len(targets)]
        t0 = time.perf_counter()
        release(shown, classes, adapter, alpha, 0.5)
        warm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            radapter.merge_adapters(reference, alpha)
            head = radapter.zero_shot_classifier(reference, service.tokenizer, names, DEFAULT_TEMPLATES)
            x = service.preprocess(Image.fromarray(as_rgb_array(shown))).unsqueeze(0)
            torch.softmax(head(reference.encode_image(x)), dim=1)
        previous.append(time.perf_counter() - t0)
    for i in range(reps):
        new_classes = f"{classes}, thing {i}"  # a class list never seen: no head is ready yet
        shown = upload()
        classify(shown, new_classes, adapter, alpha, 0.5)
        far = max(targets, key=lambda a: abs(a - alpha))  # the warmer reaches it last
        t0 = time.perf_counter()
        release(shown, new_classes, adapter, far, 0.5)
        cold.append(time.perf_counter() - t0)
        alpha = far
        service.wait_for_heads()
    http = _http_round_trips(demo, service, adapter, classes, upload, targets, reps)
    shutil.rmtree(tmp, ignore_errors=True)
    plain_s = statistics.median(plain)
    return {"adapter": adapter, "plain_s": plain_s, "after_alpha_change_s": statistics.median(warm), **http,
            "after_alpha_change_cold_s": statistics.median(cold),
            "slider_cold_over_plain": statistics.median(cold) / plain_s, "heads_ready_s": heads_ready,
            "previous_path_s": statistics.median(previous),
            "previous_path_over_plain": statistics.median(previous) / plain_s}


def _http_round_trips(demo, service, adapter: str, classes: str, upload, targets: list[float], reps: int) -> dict:
    """The same two user actions through HTTP and Gradio's queue (``gradio_client``), for scale:
    a Classify click on a new upload (three columns) and a slider release (the client uploads
    the file again each call; the browser does not)."""
    from gradio_client import Client, handle_file

    from app.main import launch

    demo.queue()
    launch(demo, prevent_thread_lock=True, quiet=True)  # as the app is served, request limits included
    try:
        client = Client(demo.local_url, verbose=False)
        alpha, clicks, releases = targets[0], [], []
        for i in range(reps):
            shown = handle_file(upload())
            t0 = time.perf_counter()
            client.predict(shown, classes, adapter, alpha, 0.5, api_name="/classify")
            clicks.append(time.perf_counter() - t0)
            service.wait_for_heads()
            alpha = targets[(i + 1) % len(targets)]
            t0 = time.perf_counter()
            client.predict(shown, classes, adapter, alpha, 0.5, api_name="/set_alpha")
            releases.append(time.perf_counter() - t0)
    finally:
        demo.close()
    return {"http_classify_new_image_s": statistics.median(clicks), "http_release_s": statistics.median(releases)}


VISITOR_PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")
VISITOR_QUERIES = ("a red heart", "a smiling face", "a cat", "a car", "a flag", "a tree", "a pizza", "a rocket")


def _visitor_inputs(tmp: Path) -> list[str]:
    from PIL import Image
    from skimage import data

    paths = []
    for name in VISITOR_PHOTOS:
        path = tmp / f"{name}.png"
        Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB").resize((320, 240)).save(path)
        paths.append(str(path))
    return paths


def _wait_for_indexes(client, adapters: list[str], timeout: float = 1800.0) -> float:
    """Start every adapter's index grid (as choosing it in the page does) and wait until all are built."""
    t0 = time.perf_counter()
    pending = list(adapters)
    while pending:
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"indexes not built within {timeout:.0f} s: {pending}")
        status = client.predict(pending[0], api_name="/select_adapter")[-1]
        if "failed" in status or "off" in status:
            raise RuntimeError(f"retrieval for {pending[0]!r}: {status}")
        if status == "indexes ready":
            pending.pop(0)
        else:
            time.sleep(1.0)
    return time.perf_counter() - t0


def _percentiles(values: list[float]) -> dict[str, float]:
    return {"p50_s": float(np.percentile(values, 50)), "p95_s": float(np.percentile(values, 95)), "n": len(values)}


def many_visitors(visitors: int, rounds: int, index_dir: str, app_args: list[str] | None = None) -> dict:
    """One visitor alone, then ``visitors`` at once, through the served app's HTTP API (see the module doc)."""
    import threading

    from gradio_client import Client, handle_file

    tmp = Path(tempfile.mkdtemp(prefix="app-visitors-"))
    photos = _visitor_inputs(tmp)
    proc, url, _ = start_app(["--index-dir", index_dir, *(app_args or [])])
    try:
        admin = Client(url, verbose=False)
        adapters = [a for a in admin.view_api(return_format="dict", print_info=False)["named_endpoints"]
                    ["/select_adapter"]["parameters"][0]["type"]["enum"]]
        indexes_s = _wait_for_indexes(admin, adapters)

        def visit(i: int, n_rounds: int, record: list, errors: list, wrong_alpha: list) -> None:
            client = Client(url, verbose=False)  # a session of its own
            adapter, alpha = adapters[i % len(adapters)], round(0.1 + 0.8 * i / max(1, visitors - 1), 2)
            stated = f"alpha used: **{alpha:g}**", f"alpha used: {alpha:g};"
            calls = {
                "classify": lambda r: client.predict(handle_file(photos[(i + r) % len(photos)]),
                                                     "cat, dog, rocket, cup", adapter, alpha, 0.5,
                                                     api_name="/classify")[-1],
                "search_text": lambda r: client.predict(VISITOR_QUERIES[(i + r) % len(VISITOR_QUERIES)], adapter, alpha,
                                                        api_name="/search_text")[-1],
                "segment": lambda r: client.predict(handle_file(photos[(i + r + 1) % len(photos)]), "cat, background",
                                                    adapter, alpha, api_name="/segment")[-1],
            }
            for r in range(n_rounds):
                for name, call in calls.items():
                    t0 = time.perf_counter()
                    try:
                        note = str(call(r))
                    except Exception as e:  # an error answer is a result to count, not a crash of the benchmark
                        errors.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    record.append((name, time.perf_counter() - t0))
                    if not note.startswith(stated):
                        wrong_alpha.append(f"{name} at {alpha}: {note[:80]}")

        def phase(n: int) -> dict:
            record, errors, wrong = [], [], []
            threads = [threading.Thread(target=visit, args=(i, rounds, record, errors, wrong)) for i in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            names = dict.fromkeys(e for e, _ in record)
            per = {name: _percentiles([s for e, s in record if e == name]) for name in names}
            return {"visitors": n, "endpoints": per, "requests": len(record), "requests_per_s": len(record) / wall,
                    "errors": errors, "alpha_not_stated": wrong, "wall_s": wall}

        visit(0, 1, [], [], [])  # warm-up: first heads, first merges, first plots
        one, many = phase(1), phase(visitors)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = {e: many["endpoints"][e]["p95_s"] / one["endpoints"][e]["p50_s"] for e in one["endpoints"]
             if e in many["endpoints"]}
    return {"app_args": app_args or [], "one": one, "many": many, "p95_over_one_p50": ratio, "rounds": rounds,
            "indexes_built_s": indexes_s,
            "goals_met": {"p95_over_one_p50": all(v <= 4 for v in ratio.values()),
                          "no_errors": not (one["errors"] or many["errors"]),
                          "alpha_stated": not (one["alpha_not_stated"] or many["alpha_not_stated"])}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--visitors", type=int, default=8, help="visitors at once in the many-visitors run")
    p.add_argument("--rounds", type=int, default=5, help="classify + search + segment rounds per visitor")
    p.add_argument("--index-dir", default=str(Path.home() / ".cache" / "radapter" / "indexes"),
                   help="retrieval index cache for the served app (reused across runs)")
    p.add_argument("--only-visitors", action="store_true", help="run only the many-visitors part and merge its "
                                                                 "keys into --out")
    p.add_argument("--app-args", default="", help="extra python -m app options for the many-visitors run, "
                                                  "e.g. '--concurrency 1'")
    p.add_argument("--out", default="docs/bench/app.json")
    args = p.parse_args()
    app_args = args.app_args.split()
    load_before = os.getloadavg()  # other jobs on the machine skew every figure; say how busy it was
    if args.only_visitors:
        import json

        old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        kept = {k: v for k, v in old.items() if k not in ("date", "command", "machine")}
        result = {**kept, "visitors": many_visitors(args.visitors, args.rounds, args.index_dir, app_args)}
    else:
        start = cold_start()
        lat = slider_latency(args.reps)
        result = {"cold_start_s": start, "slider_over_plain": lat["after_alpha_change_s"] / lat["plain_s"], **lat,
                  "visitors": many_visitors(args.visitors, args.rounds, args.index_dir, app_args)}
    result.update(load_average_before_after=[load_before[0], os.getloadavg()[0]],
                  goals={"cold_start_s": "<= 20", "slider_over_plain": "<= 1.2",
                         "visitors.p95_over_one_p50": "<= 4 per endpoint", "visitors.errors": "none",
                         "visitors.alpha_not_stated": "none"})
    write_result(args.out, result, "benchmarks.app_bench")


if __name__ == "__main__":
    main()
