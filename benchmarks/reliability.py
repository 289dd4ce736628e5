"""Hostile input against a running app: what each bad request gets back, and the app's memory.

    python -m benchmarks.reliability                    # starts python -m app; writes docs/bench/reliability.json
    python -m benchmarks.reliability --url http://127.0.0.1:7860        # an app already running on this machine

Without ``--url`` it starts ``python -m app`` on a free loopback port (the shipped adapters, a
six-photo retrieval collection so search answers, a temporary upload folder) and stops it
at the end; ``--url`` takes only a loopback address. Every case is one request (two in
parallel for the concurrent ones) through the HTTP API as a hostile client sends it
(``/gradio_api/call/<api>``, images as uploads, ``data:`` URLs, links or server paths):
corrupt and truncated PNG/JPEG files, decompression bombs, ``data:`` URLs over the byte
limit or claiming too many pixels, wrong types for every argument of every endpoint, and
malformed request bodies. Each case is recorded as one outcome:

- ``answered``: a result (right for a valid request, or a harmless one such as a number as a class name);
- ``message``: refused with one clear sentence (an error event, or an HTTP 4xx with a ``detail``);
- ``no message``: refused with no sentence (an error event without one, an HTTP 5xx);
- ``stack trace``: the response holds a Python traceback;
- ``hung``: no answer within ``--timeout`` seconds;
- ``crashed``: the connection failed or the app process died.

``ok`` says whether the outcome is one the case allows (e.g. a bomb must be a ``message``).
The app's resident memory (``/proc/PID/status``) is sampled every 10 ms: per case its peak,
and overall the kernel's high-water mark. The run is bounded: a fixed list of about 400
requests, each with a timeout, and ``--budget`` seconds in all (later cases are then skipped).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import ipaddress
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image

from benchmarks.common import free_port, write_result

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
FILE = {"_type": "gradio.FileData"}
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+")
OUTCOMES = ("answered", "message", "no message", "stack trace", "hung", "crashed")
REFUSE = ("message",)
EITHER = ("answered", "message")


# ------------------------------------------------------------------------------------ the app
def _loopback(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"--url must be a loopback address (127.0.0.1, ::1 or localhost), not {host!r}")
    return url.rstrip("/")


def _listener_pid(port: int) -> int | None:
    """The process listening on a local TCP ``port`` (read from /proc), if it is visible to us."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{parts[9]}]")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
    return None


def _rss_mb(pid: int, key: str = "VmRSS") -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


class Memory:
    """Samples a process's resident memory every 10 ms; ``peak()`` since the last ``reset()``."""

    def __init__(self, pid: int | None) -> None:
        self.pid, self._peak, self._lock = pid, 0.0, threading.Lock()
        self._stop = threading.Event()
        if pid is not None:
            threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            rss = _rss_mb(self.pid)
            if rss is not None:
                with self._lock:
                    self._peak = max(self._peak, rss)

    def reset(self) -> None:
        with self._lock:
            self._peak = (_rss_mb(self.pid) or 0.0) if self.pid is not None else 0.0

    def peak(self) -> float | None:
        if self.pid is None:
            return None
        time.sleep(0.02)  # one more sample after the answer
        with self._lock:
            return self._peak

    def close(self) -> None:
        self._stop.set()


class App:
    """``python -m app`` on a free loopback port, or an app already running at ``url``."""

    def __init__(self, url: str | None, pid: int | None, workdir: Path) -> None:
        self.proc: subprocess.Popen | None = None
        self.workdir = workdir
        self.restarts = 0
        if url is None:
            self.start()
        else:
            self.url = _loopback(url)
            self.pid = pid or _listener_pid(urlparse(self.url).port or 80)

    def start(self, timeout: float = 240.0) -> None:
        photos = self.workdir / "collection"
        photos.mkdir(parents=True, exist_ok=True)
        import skimage.data

        for name in ("chelsea", "coffee", "rocket", "astronaut", "camera", "horse"):
            photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
            photo.resize((160, 160)).save(photos / f"{name}.png")
        port = free_port()
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
               "GRADIO_TEMP_DIR": str(self.workdir / "gradio")}
        self.log = (self.workdir / "app.log").open("a")
        self.proc = subprocess.Popen([sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port),
                                      "--no-prepare", "--collection", f"folder:{photos}",
                                      "--index-dir", str(self.workdir / "indexes")],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url, self.pid = f"http://127.0.0.1:{port}", self.proc.pid
        t0 = time.monotonic()
        while not self.alive():
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the app did not start; see {self.workdir / 'app.log'}")
            time.sleep(0.2)  # polling the port
        self.start_s = round(time.monotonic() - t0, 1)

    def alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            return False
        try:
            return httpx.get(f"{self.url}/config", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


# ----------------------------------------------------------------------------------- requests
@dataclass
class Answer:
    outcome: str
    message: str | None = None
    status: int | None = None


def _classify_text(text: str | None) -> str:
    if text and TRACEBACK.search(text):
        return "stack trace"
    if not isinstance(text, str) or not text.strip() or "\n" in text.strip():
        return "no message"
    return "message"


def _post(url: str, timeout: float, **kwargs: Any) -> httpx.Response | Answer:
    """POST; a 200 response, or what happened instead as an Answer (hung, crashed, refused)."""
    try:
        r = httpx.post(url, timeout=timeout, **kwargs)
    except httpx.TimeoutException:
        return Answer("hung")
    except httpx.TransportError as e:
        return Answer("crashed", type(e).__name__)
    return r if r.status_code == 200 else _http_answer(r)


def call(url: str, api: str, body: bytes, timeout: float) -> Answer:
    """One event through ``/gradio_api/call/<api>``: POST the body, then read the event stream."""
    deadline = time.monotonic() + timeout
    r = _post(f"{url}/gradio_api/call/{api}", timeout, content=body, headers={"content-type": "application/json"})
    if isinstance(r, Answer):
        return r
    try:
        event_id = r.json()["event_id"]
        event, data = None, None
        with httpx.stream("GET", f"{url}/gradio_api/call/{api}/{event_id}", timeout=timeout) as s:
            for line in s.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    data = line.split(":", 1)[1].strip()
                if event in ("complete", "error") and data is not None:
                    break
                if event not in ("complete", "error"):
                    data = None
                if time.monotonic() > deadline:
                    return Answer("hung")
    except httpx.TimeoutException:
        return Answer("hung")
    except httpx.TransportError as e:
        return Answer("crashed", type(e).__name__)
    if event == "complete":
        return Answer("answered", (data or "")[:160])
    if event == "error":
        try:
            message = (json.loads(data or "null") or {}).get("error")
        except (ValueError, AttributeError):
            message = data
        return Answer(_classify_text(message), message)
    return Answer("no message", f"stream ended without a result ({event})")


def _http_answer(r: httpx.Response) -> Answer:
    try:
        detail = r.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):  # FastAPI's validation errors: one "msg" per problem
        detail = "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
    if detail is None and r.status_code < 500 and r.headers.get("content-type", "").startswith("text/plain"):
        detail = r.text.strip()  # Gradio's upload route answers a refusal in plain text
    if r.status_code >= 500 or not isinstance(detail, str):
        text = detail if isinstance(detail, str) else r.text[:300]
        return Answer("stack trace" if TRACEBACK.search(text or "") else "no message", text, r.status_code)
    return Answer(_classify_text(detail), detail, r.status_code)


def upload(url: str, name: str, raw: bytes, timeout: float) -> dict | Answer:
    """Upload ``raw`` as a file; the file object to send, or the refusal as an Answer."""
    r = _post(f"{url}/gradio_api/upload", timeout, files={"files": (name, raw)})
    if isinstance(r, Answer):
        return r
    return {"path": r.json()[0], "orig_name": name, "meta": FILE}


# ------------------------------------------------------------------------------------- inputs
def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def flat_png(width: int, height: int, value: int = 0) -> bytes:
    """A valid one-colour RGB PNG of ``width`` x ``height``, compressed row by row (a decompression bomb when big)."""
    z = zlib.compressobj(9)
    row = b"\0" + bytes([value]) * (3 * width)
    parts = [z.compress(row) for _ in range(height)]
    idat = b"".join(parts) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height``, with almost no pixel data."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def jpeg_header(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims ``width`` x ``height``."""
    raw = bytearray(jpeg(np.full((64, 64, 3), 200, np.uint8)))
    sof = raw.find(b"\xff\xc0")
    raw[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def data_url(raw: bytes, mime: str = "image/png") -> dict:
    return {"path": None, "url": f"data:{mime};base64," + base64.b64encode(raw).decode(), "meta": FILE}


def body(data: Any) -> bytes:
    return json.dumps({"data": data}).encode()  # NaN and Infinity travel as Python's json writes them


# -------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    api: str
    make: Callable[[], bytes | list[bytes] | Answer]  # the body (one per parallel request), or a refused upload
    allowed: tuple[str, ...] = REFUSE
    parallel: int = 1


@dataclass
class Result:
    name: str
    api: str
    outcome: str
    ok: bool
    message: str | None
    status: int | None
    seconds: float
    rss_before_mb: float | None
    rss_peak_mb: float | None
    parallel: int = 1
    outcomes: list[str] = field(default_factory=list)


def endpoints(adapter: str, image: dict, small: dict) -> dict[str, list[tuple[str, str, Any]]]:
    """Every endpoint's arguments as (name, kind, valid value); kind picks the allowed outcomes."""
    return {
        "classify": [("image", "image", image), ("classes", "text", "cat, dog"), ("adapter", "choice", adapter),
                     ("alpha", "number", 0.5), ("beta", "number", 0.5)],
        "set_alpha": [("image", "image", image), ("classes", "text", "cat, dog"), ("adapter", "choice", adapter),
                      ("alpha", "number", 0.35), ("beta", "number", 0.5)],
        "segment": [("image", "image", small), ("classes", "text", "cat, dog"), ("adapter", "choice", adapter),
                    ("alpha", "number", 0.5)],
        "inspect": [("image", "image", small), ("classes", "text", "cat, dog"), ("corruption", "choice", "fog"),
                    ("severity", "number", 3), ("adapter", "choice", adapter), ("alpha", "number", 0.5),
                    ("beta", "number", 0.5)],
        "search_text": [("query", "text", "a cat"), ("adapter", "choice", adapter), ("alpha", "number", 0.5)],
        "search_image": [("image", "image", small), ("adapter", "choice", adapter), ("alpha", "number", 0.5)],
        "emoji_pair": [("name", "choice", None)],
        "benchmark_classes": [("benchmark", "choice", "fmnist")],
        "select_adapter": [("adapter", "choice", adapter)],
    }


WRONG = {"null": None, "text": "abc", "fraction": 3.5, "nan": float("nan"), "infinity": float("inf"),
         "negative": -1, "list": [1], "object": {"a": 1}, "bool": True, "100 KB text": "x" * 100_000}


def cases(app: App, adapter: str, timeout: float) -> list[Case]:
    rng = np.random.default_rng(0)
    noise = (rng.random((256, 256, 3)) * 255).astype(np.uint8)
    small = data_url(png(noise[:96, :96]))
    image = data_url(png(noise[:64, :64]))
    bomb = flat_png(12_000, 12_000)  # ~420 KB: 144 megapixels, 432 MB decoded
    near_limit = flat_png(7_000, 7_000)  # 49 megapixels: just under the limit
    big_png = png((rng.random((1500, 1500, 3)) * 255).astype(np.uint8))  # ~6.8 MB of noise
    truncated_png, truncated_jpeg = png(noise)[:20_000], jpeg(noise)[:5_000]

    def classify_with(img: Any) -> bytes:
        return body([img, "cat, dog", adapter, 0.5, 0.5])

    def uploaded(name: str, raw: bytes) -> Callable[[], bytes | Answer]:
        def make() -> bytes | Answer:
            got = upload(app.url, name, raw, timeout)
            return got if isinstance(got, Answer) else classify_with(got)
        return make

    out = [
        Case("valid 64x64 PNG (data: URL)", "classify", lambda: classify_with(image), ("answered",)),
        Case("valid 96x96 PNG (upload)", "classify", uploaded("ok.png", png(noise[:96, :96])), ("answered",)),
        Case("corrupt file named .png (upload)", "classify", uploaded("corrupt.png", rng.bytes(4096))),
        Case("truncated PNG (upload)", "classify", uploaded("truncated.png", truncated_png)),
        Case("truncated JPEG (upload)", "classify", uploaded("truncated.jpg", truncated_jpeg)),
        Case("truncated PNG (data: URL)", "classify", lambda: classify_with(data_url(truncated_png))),
        Case("truncated JPEG (data: URL)", "classify", lambda: classify_with(data_url(truncated_jpeg, "image/jpeg"))),
        Case(f"PNG bomb 12000x12000, {len(bomb) // 1024} KB (upload)", "classify", uploaded("bomb.png", bomb)),
        Case(f"PNG bomb 12000x12000, {len(bomb) // 1024} KB (data: URL)", "classify",
             lambda: classify_with(data_url(bomb))),
        Case("PNG bomb (data: URL), 2 in parallel", "classify", lambda: classify_with(data_url(bomb)), parallel=2),
        Case("PNG header claiming 12000x12000 (data: URL)", "classify",
             lambda: classify_with(data_url(png_header(12_000, 12_000)))),
        Case("JPEG header claiming 65000x1000 (data: URL)", "classify",
             lambda: classify_with(data_url(jpeg_header(65_000, 1_000), "image/jpeg"))),
        Case("PNG 7000x7000, 49 megapixels: under the limit (data: URL)", "classify",
             lambda: classify_with(data_url(near_limit)), ("answered",)),
        Case("two other PNGs 7000x7000 (data: URL), in parallel", "classify",
             lambda: [classify_with(data_url(flat_png(7_000, 7_000, v))) for v in (1, 2)], ("answered",), parallel=2),
        Case(f"PNG of {len(big_png) / MB:.2f} MB (upload)", "classify", uploaded("big.png", big_png)),
        Case(f"PNG of {len(big_png) / MB:.2f} MB (data: URL)", "classify", lambda: classify_with(data_url(big_png))),
        Case("image padded to 5 MB + 1 KB (data: URL)", "classify",
             lambda: classify_with(data_url(png(noise[:64, :64]) + b"\0" * (5 * MB + 1024)))),
        Case("12 MB data: URL", "classify", lambda: classify_with(data_url(b"\0" * 12 * MB))),
        Case("data: URL that is not base64", "classify",
             lambda: classify_with({"path": None, "url": "data:image/png;base64,!!!!", "meta": FILE})),
        Case("data: URL of text", "classify", lambda: classify_with(data_url(b"hello", "text/plain"))),
        Case("data: URL without ;base64", "classify",
             lambda: classify_with({"path": None, "url": "data:image/png,abc", "meta": FILE})),
        Case("a link to an image", "classify",
             lambda: classify_with({"path": "https://example.com/cat.png", "meta": FILE})),
        Case("a server path (/etc/passwd)", "classify", lambda: classify_with({"path": "/etc/passwd", "meta": FILE})),
        Case("a path escaping the upload folder", "classify",
             lambda: classify_with({"path": str(app.workdir / "gradio" / ".." / "app.log"), "meta": FILE})),
        Case("200 class names", "classify",
             lambda: body([image, ",".join(f"c{i}" for i in range(200)), adapter, 0.5, 0.5])),
        Case("duplicate class names", "classify", lambda: body([image, "cat, dog, cat", adapter, 0.5, 0.5]),
             ("answered",)),
        Case("alpha as a numeric string", "set_alpha", lambda: body([image, "cat, dog", adapter, "0.25", 0.5]),
             EITHER),
        Case("an unknown adapter", "classify", lambda: body([image, "cat", "../../etc/passwd", 0.5, 0.5])),
        Case("an unknown corruption", "inspect", lambda: body([small, "cat", "rm -rf", 3, adapter, 0.5, 0.5])),
        Case("image too small for a corruption", "inspect",
             lambda: body([data_url(png(noise[:8, :8])), "cat", "fog", 3, adapter, 0.5, 0.5])),
        Case("body that is not JSON", "classify", lambda: b"{not json"),
        Case("empty body", "classify", lambda: b""),
        Case("data that is not a list", "classify", lambda: b'{"data": 5}'),
        Case("too few arguments", "classify", lambda: body([image])),
        Case("too many arguments", "classify", lambda: body([image, "cat", adapter, 0.5, 0.5, 1, 2]), EITHER),
        Case("an endpoint that does not exist", "nope", lambda: body([1])),
        Case("JSON nested 100000 deep", "classify", lambda: b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ]
    for api, args in endpoints(adapter, image, small).items():
        for i, (arg, kind, _) in enumerate(args):
            for label, value in WRONG.items():
                def make(api: str = api, args: list = args, i: int = i, value: Any = value) -> bytes:
                    data = [v for _, _, v in args]
                    data[i] = value
                    return body(data)
                allowed = REFUSE if kind in ("image", "number") else EITHER
                if api == "set_alpha" and arg == "image" and value is None:
                    allowed = EITHER  # the browser's release before any upload: the note states the alpha
                out.append(Case(f"{arg} = {label}", api, make, allowed))
    return out


def run_case(app: App, case: Case, memory: Memory, timeout: float) -> Result:
    before = _rss_mb(app.pid) if app.pid is not None else None
    memory.reset()
    t0 = time.perf_counter()
    made = case.make()
    if isinstance(made, Answer):
        answers = [made]
    elif case.parallel == 1 and isinstance(made, bytes):
        answers = [call(app.url, case.api, made, timeout)]
    else:
        bodies = made if isinstance(made, list) else [made] * case.parallel
        with ThreadPoolExecutor(case.parallel) as pool:
            answers = list(pool.map(lambda b: call(app.url, case.api, b, timeout), bodies))
    seconds = round(time.perf_counter() - t0, 3)
    peak = memory.peak()
    if not app.alive():
        answers = [Answer("crashed", "the app stopped answering")]
    worst = max(answers, key=lambda a: OUTCOMES.index(a.outcome) if a.outcome not in case.allowed else -1)
    return Result(case.name, case.api, worst.outcome, all(a.outcome in case.allowed for a in answers),
                  worst.message[:200] if worst.message else None, worst.status, seconds, before, peak, case.parallel,
                  [a.outcome for a in answers])


def adapters_of(url: str) -> list[str]:
    config = httpx.get(f"{url}/config", timeout=10).json()
    dropdown = next(c for c in config["components"] if c.get("props", {}).get("label") == "Adapter (server-side files)")
    return [c[0] for c in dropdown["props"]["choices"]]


def wait_for_search(url: str, adapter: str, timeout: float) -> bool:
    """Wait (polling, bounded) while the retrieval index builds, so the search cases meet it.

    ``False`` if search does not answer (retrieval off, or still building after ``timeout``).
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = call(url, "search_text", body(["a cat", adapter, 0.5]), 30)
        if got.outcome == "answered":
            return True
        if "being built" not in (got.message or ""):
            return False
        time.sleep(1.0)  # polling the index build
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="an app already running on a loopback address (default: start one)")
    p.add_argument("--pid", type=int, default=None, help="its process id (default: found from its port)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take before it counts as hung")
    p.add_argument("--budget", type=float, default=1200.0, help="seconds for all cases (later ones are skipped)")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench" / "reliability.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="radapter-reliability-") as tmp:
        app = App(args.url, args.pid, Path(tmp))
        memory = Memory(app.pid)
        try:
            result = _run(app, memory, args)
        finally:
            memory.close()
            app.stop()
    write_result(args.out, result, "benchmarks.reliability")
    return 0 if result["summary"]["not_ok"] == 0 else 1


def _run(app: App, memory: Memory, args: argparse.Namespace) -> dict[str, Any]:
    names = adapters_of(app.url)
    adapter = names[0]
    rss_start = _rss_mb(app.pid) if app.pid else None
    search_ready = wait_for_search(app.url, adapter, 240)
    rss_ready = _rss_mb(app.pid) if app.pid else None
    results: list[Result] = []
    skipped: list[str] = []
    todo = cases(app, adapter, args.timeout)
    t0 = time.monotonic()
    for n, case in enumerate(todo):
        if time.monotonic() - t0 > args.budget:
            skipped += [c.name for c in todo[n:]]
            break
        res = run_case(app, case, memory, args.timeout)
        results.append(res)
        print(f"{'ok ' if res.ok else 'BAD'} {res.outcome:11s} {res.seconds:6.2f}s {res.rss_peak_mb or 0:7.0f} MB  "
              f"{case.api}: {case.name}: {res.message or ''}"[:200], flush=True)
        if res.outcome == "crashed":
            if app.proc is None:  # not ours to restart
                skipped += [c.name for c in todo[n + 1:]]
                break
            app.stop()
            app.restarts += 1
            app.start()
            memory.close()
            memory = Memory(app.pid)
    counts = {o: sum(r.outcome == o for r in results) for o in OUTCOMES}
    peaks = [r.rss_peak_mb for r in results if r.rss_peak_mb is not None]
    return {
        "app": {"url": "started by the script" if app.proc is not None else app.url, "adapter": adapter,
                "adapters": names, "start_s": getattr(app, "start_s", None), "restarts": app.restarts,
                "search_ready": search_ready},
        "summary": {
            "cases": len(results), "requests": sum(r.parallel for r in results), "ok": sum(r.ok for r in results),
            "not_ok": sum(not r.ok for r in results), "outcomes": counts, "skipped": len(skipped),
            "rss_mb": {"after_start": rss_start, "after_warm_up": rss_ready, "peak_in_a_case": max(peaks, default=None),
                       "high_water_mark": _rss_mb(app.pid, "VmHWM") if app.pid else None},
            "rss_growth_in_a_case_mb": max((round(r.rss_peak_mb - r.rss_before_mb, 1) for r in results
                                            if r.rss_peak_mb is not None and r.rss_before_mb is not None),
                                           default=None),
            "slowest_case_s": max((r.seconds for r in results), default=None),
            "total_s": round(time.monotonic() - t0, 1),
            "not_ok_cases": [f"{r.api}: {r.name} -> {r.outcome}" for r in results if not r.ok],
        },
        "outcome_meanings": {
            "answered": "a result", "message": "refused with one clear sentence",
            "no message": "refused without a sentence", "stack trace": "the response holds a traceback",
            "hung": "no answer in time", "crashed": "connection failed or the app died"},
        "cases": [asdict(r) for r in results],
        "skipped": skipped,
    }


if __name__ == "__main__":
    sys.exit(main())
