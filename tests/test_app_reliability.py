"""Hostile input through the app's HTTP API: every bad request gets one clear sentence.

A tiny-model app is launched in-process the way ``python -m app`` launches it
(``app.main.launch``), and requests are sent as raw JSON (``/gradio_api/call/<api>``),
as a hostile client would send them: images as ``data:`` URLs, links and server paths,
and wrong types for the numeric arguments. One test starts ``python -m app`` itself with
an adapter folder holding files with bad metadata.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from app.examples import Examples
from app.service import MAX_PIXELS, discover_adapters
from tests.conftest import tiny_service

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
FILE = {"_type": "gradio.FileData"}
IMAGE = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)


class FakeEmoji(Examples):
    """Examples with a two-emoji benchmark in memory (the real one needs preparing)."""

    def _emoji_data(self):
        rgba = np.full((2, 16, 16, 4), 255, np.uint8)
        return {"grinning face": 0, "red heart": 1}, rgba, rgba


_service = tiny_service


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> Iterator[str]:
    from app.main import launch
    from app.ui import build_ui

    tmp = tmp_path_factory.mktemp("reliability")
    demo = build_ui(_service(tmp), None, FakeEmoji(tmp / "examples", data=tmp / "no-data"))
    demo.queue()
    launch(demo, prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url.rstrip("/")
    finally:
        demo.close()


def call(url: str, api: str, data: Any, timeout: float = 60) -> tuple[str, Any]:
    """``("complete", outputs)``, ``("error", message)`` or ``("refused", (status, detail))``.

    The body is sent as Python's ``json`` writes it, so ``nan`` travels as ``NaN``.
    """
    body = data if isinstance(data, bytes) else json.dumps({"data": data}).encode()
    r = httpx.post(f"{url}/gradio_api/call/{api}", content=body, timeout=timeout,
                   headers={"content-type": "application/json"})
    if r.status_code != 200:
        return "refused", (r.status_code, r.json().get("detail"))
    event_id = r.json()["event_id"]
    stream = httpx.get(f"{url}/gradio_api/call/{api}/{event_id}", timeout=timeout).text
    event, payload = None, None
    for line in stream.splitlines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            payload = json.loads(line.split(":", 1)[1])
    if event == "error":
        return "error", (payload or {}).get("error")
    return event, payload


def message(url: str, api: str, data: Any) -> str:
    """The one-line message a bad request gets (fails if it is answered otherwise)."""
    kind, got = call(url, api, data)
    if kind == "refused":
        got = got[1]
    assert kind in ("error", "refused"), (kind, got)
    assert isinstance(got, str) and got, f"no message for {api} {str(data)[:200]}"
    assert "\n" not in got and "Traceback" not in got and not got.startswith(("'", '"')), got
    return got


def data_url(raw: bytes, mime: str = "image/png") -> dict:
    return {"path": None, "url": f"data:{mime};base64," + base64.b64encode(raw).decode(), "meta": FILE}


def png_bytes(array: np.ndarray = IMAGE) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header is rewritten to claim ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "JPEG")
    raw = bytearray(buf.getvalue())
    sof = raw.find(b"\xff\xc0")
    raw[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def classify_args(image: Any, classes: str = "cat, dog", alpha: Any = 0.5, beta: Any = 0.5) -> list:
    return [image, classes, "colours", alpha, beta]


# ---------------------------------------------------------------------------------------- images
def test_a_good_data_url_is_classified(url):
    kind, out = call(url, "classify", classify_args(data_url(png_bytes())))
    assert kind == "complete" and "alpha used: **0.5**" in out[3]


@pytest.mark.parametrize("raw, mime", [(png_claiming(12_000, 12_000), "image/png"),
                                       (jpeg_claiming(65_000, 1_000), "image/jpeg")], ids=["png", "jpeg"])
def test_a_data_url_claiming_too_many_pixels_is_refused_from_its_header(url, raw, mime):
    assert len(raw) < 1000  # the header alone: nothing to decode
    got = message(url, "classify", classify_args(data_url(raw, mime)))
    assert "megapixels" in got and str(MAX_PIXELS // 1_000_000) in got


def test_a_data_url_over_the_byte_limit_is_refused(url):
    # A valid image padded past 5 MB: under the request limit, so the image check answers.
    padded = png_bytes() + b"\0" * (5 * MB + 1000)
    got = message(url, "classify", classify_args(data_url(padded)))
    assert "5 MB" in got
    # Far past it: the request is refused before its body is read (declared and chunked bodies).
    big = json.dumps({"data": classify_args(data_url(b"\0" * 8 * MB))}).encode()
    kind, (status, detail) = call(url, "classify", big)
    assert kind == "refused" and status == 413 and "5 MB" in detail

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), MB):
            yield big[start:start + MB]
    r = httpx.post(f"{url}/gradio_api/call/classify", content=chunks(), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "5 MB" in r.json()["detail"]


def test_links_and_server_paths_are_refused_without_fetching(url):
    got = message(url, "classify", classify_args({"path": "https://example.com/cat.png", "meta": FILE}))
    assert "link" in got
    got = message(url, "classify", classify_args({"path": "/etc/hostname", "meta": FILE}))
    assert "upload" in got


@pytest.mark.parametrize("image", ["abc", 3, [1, 2], {"url": 5}, {"path": None, "meta": FILE},
                                   {"path": None, "url": "data:image/png;base64,!!!!", "meta": FILE}],
                         ids=["string", "number", "list", "url-number", "no-path", "bad-base64"])
def test_wrong_image_values_get_a_message(url, image):
    got = message(url, "classify", classify_args(image))
    assert "image" in got.lower()


def test_every_image_endpoint_applies_the_limits(url):
    bomb = data_url(png_claiming(12_000, 12_000))
    assert "megapixels" in message(url, "segment", [bomb, "cat", "colours", 0.5])
    assert "megapixels" in message(url, "inspect", [bomb, "cat", "fog", 3, "colours", 0.5, 0.5])
    assert "megapixels" in message(url, "set_alpha", classify_args(bomb))


def test_image_inputs_keep_gradios_api_schema():
    from app.ui import image_input

    assert image_input().api_info() == gr.Image(type="filepath").api_info()


# ------------------------------------------------------------------------------- numeric arguments
@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 2, -0.5, "abc", None, [0.5], {"a": 1}, True],
                         ids=["nan", "inf", "2", "negative", "abc", "null", "list", "object", "bool"])
@pytest.mark.parametrize("api", ["set_alpha", "classify"])
def test_a_bad_alpha_gets_one_clear_sentence(url, api, alpha):
    got = message(url, api, classify_args(data_url(png_bytes()), alpha=alpha))
    assert got.startswith("alpha must be a number from 0 to 1"), got


def test_a_numeric_string_alpha_is_read_as_the_number(url):
    kind, out = call(url, "set_alpha", classify_args(data_url(png_bytes()), alpha="0.25"))
    assert kind == "complete" and "alpha used: **0.25**" in out[3]


@pytest.mark.parametrize("beta", [float("nan"), 1.5, "x", None], ids=["nan", "1.5", "x", "null"])
def test_a_bad_beta_gets_one_clear_sentence(url, beta):
    assert message(url, "classify", classify_args(data_url(png_bytes()), beta=beta)).startswith(
        "beta must be a number from 0 to 1")


@pytest.mark.parametrize("severity", [float("nan"), 0, 6, 2.5, "x", None], ids=["nan", "0", "6", "2.5", "x", "null"])
def test_a_bad_severity_gets_one_clear_sentence(url, severity):
    image = data_url(png_bytes(np.zeros((64, 64, 3), np.uint8)))
    got = message(url, "inspect", [image, "cat, dog", "fog", severity, "colours", 0.5, 0.5])
    assert got.startswith("severity must be a whole number from 1 to 5"), got


# ------------------------------------------------------------------------------- text and choices
def test_duplicate_class_names_are_merged_and_said_so(url):
    kind, out = call(url, "classify", classify_args(data_url(png_bytes()), classes="cat, dog, cat"))
    assert kind == "complete"
    assert [c["label"] for c in out[2]["confidences"]] in (["cat", "dog"], ["dog", "cat"])
    assert "duplicate class names merged: cat" in out[3]


def test_missing_class_names_get_a_message(url):
    assert "class name" in message(url, "classify", classify_args(data_url(png_bytes()), classes=None))


def test_emoji_pair_asks_for_a_choice_when_the_benchmark_is_ready(url):
    got = message(url, "emoji_pair", [None])
    assert "Pick an emoji" in got and "prepare" not in got
    kind, out = call(url, "emoji_pair", ["red heart"])
    assert kind == "complete" and len(out) == 2


def test_emoji_pair_without_the_benchmark_says_how_to_prepare_it(tmp_path):
    from app.ui import build_ui

    demo = build_ui(_service(tmp_path), None, Examples(tmp_path / "examples", data=tmp_path / "no-data"))
    fn = next(f.fn for f in demo.fns.values() if f.api_name == "emoji_pair")
    with pytest.raises(gr.Error, match="prepare emoji"):
        fn(None)


def test_unknown_endpoints_and_missing_arguments_get_a_message(url):
    got = message(url, "nope", [1])
    assert got.startswith("There is no endpoint /nope;") and "/classify" in got
    got = message(url, "classify", [data_url(png_bytes())])
    assert got == "/classify takes 5 arguments (image, classes, adapter, alpha, beta); got 1."
    kind, _ = call(url, "classify", [*classify_args(data_url(png_bytes())), "extra"])
    assert kind == "complete"  # extra arguments are ignored, as Gradio does


def test_reliability_script_records_every_case_it_runs(url, tmp_path):
    from benchmarks.reliability import main

    out = tmp_path / "reliability.json"
    assert main(["--url", url, "--budget", "2", "--timeout", "30", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["summary"]["cases"] >= 1 and result["summary"]["not_ok"] == 0
    assert result["summary"]["cases"] + result["summary"]["skipped"] > 300  # the budget skips the rest
    assert {"name", "api", "outcome", "ok", "message", "seconds", "rss_peak_mb"} <= set(result["cases"][0])
    assert result["cases"][0]["rss_peak_mb"] > 0  # the app's process found from its port
    with pytest.raises(SystemExit, match="loopback"):
        main(["--url", "http://example.com:7860", "--out", str(out)])


# ------------------------------------------------------------------------------------- adapters
def _resave(src: Path, dst: Path, metadata: dict[str, str] | None = None, nan: bool = False) -> None:
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(src)
    if nan:
        name = next(iter(tensors))
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, dst, metadata={**meta, **(metadata or {})})


BAD_METADATA = {"alpha-abc": {"default_alpha": "abc"}, "alpha-7.5": {"default_alpha": "7.5"},
                "alpha-nan": {"default_alpha": "nan"}, "training-not-json": {"training": "{not json"},
                "training-not-an-object": {"training": "[1, 2]"}, "drm-not-json": {"drm": "{bad"}}


def _bad_folder(good: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(good, folder / "good.safetensors")
    for name, meta in BAD_METADATA.items():
        _resave(good, folder / f"{name}.safetensors", meta)
    _resave(good, folder / "nan-tensors.safetensors", nan=True)
    shutil.copy(good, folder / "bad-sweep.safetensors")
    (folder / "bad-sweep.sweep.json").write_text("{not json")


def test_adapters_with_bad_metadata_are_skipped_with_a_log_line(tmp_path, caplog):
    _service(tmp_path / "src")  # writes colours.safetensors
    _bad_folder(tmp_path / "src" / "colours.safetensors", tmp_path / "adapters")
    with caplog.at_level("WARNING", logger="app.service"):
        found = discover_adapters(tmp_path / "adapters")
    assert sorted(found) == ["bad-sweep", "good"]
    assert found["bad-sweep"].sweep is None  # an unreadable sweep is dropped, not fatal
    skipped = {r.getMessage().split()[1].rstrip(":") for r in caplog.records if r.getMessage().startswith("skipping")}
    assert skipped == {str(tmp_path / "adapters" / f"{n}.safetensors") for n in [*BAD_METADATA, "nan-tensors"]}
    assert any("bad-sweep.sweep.json" in r.getMessage() for r in caplog.records)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_python_m_app_starts_with_the_good_adapters_and_guards_requests(tmp_path):
    """``python -m app`` end to end: bad adapter files are skipped, and the request limits are on."""
    _bad_folder(ROOT / "adapters" / "fmnist.safetensors", tmp_path / "adapters")
    port = _free_port()
    log_path = tmp_path / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), "--no-prepare", "--collection", "",
                                 "--adapter-dir", str(tmp_path / "adapters")],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the app did not answer in time:\n" + log_path.read_text()
            try:
                if httpx.get(f"{url}/config", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)  # polling the port, not waiting for a result
        config = httpx.get(f"{url}/config", timeout=10).json()
        dropdown = next(c for c in config["components"] if c["props"].get("label") == "Adapter (server-side files)")
        assert [c[0] for c in dropdown["props"]["choices"]] == ["bad-sweep", "good", "none (zero-shot model)"]
        text = log_path.read_text()
        for name in [*BAD_METADATA, "nan-tensors"]:
            assert f"skipping {tmp_path / 'adapters' / name}.safetensors" in text, name
        args = [data_url(png_claiming(12_000, 12_000)), "cat, dog", "good", 0.5, 0.5]
        assert "megapixels" in message(url, "classify", args)
        big = json.dumps({"data": [data_url(b"\0" * 8 * MB), "cat", "good", 0.5, 0.5]}).encode()
        kind, (status, _) = call(url, "classify", big)
        assert kind == "refused" and status == 413
    finally:
        proc.terminate()
        proc.wait(timeout=30)
