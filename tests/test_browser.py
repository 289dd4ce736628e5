"""End-to-end: ``python -m app`` driven in headless Chromium (Debian ``chromium`` + Playwright).

No browser is downloaded: Playwright drives the system Chromium. The app runs as users
start it (the offline default model and the shipped adapters in ``adapters/``), with a
six-photo retrieval collection so its indexes build in seconds. The test moves the alpha
slider, runs every tab and checks that each shows a result stating the alpha used, that
bad input is a one-line message, and saves a screenshot of each tab (into
``$RADAPTER_SCREENSHOTS`` if set, e.g. ``docs/screenshots`` for the README; else a
temporary folder). It skips only when Chromium or Playwright is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
TIMEOUT_MS = 30_000  # one action's result; the whole test takes ~30 s on 2 CPU cores

sync_api = pytest.importorskip("playwright.sync_api",
                               reason='Playwright is not installed (pip install -e ".[dev]")')
if not Path(CHROMIUM).is_file():
    pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set $CHROMIUM)",
                allow_module_level=True)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _photos(folder: Path) -> dict[str, Path]:
    """Offline sample photos (scikit-image) as PNG files."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in ("chelsea", "coffee", "rocket", "astronaut", "camera", "horse"):
        out[name] = folder / f"{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((160, 160)).save(out[name])
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def app_url(workdir: Path) -> Iterator[str]:
    """A real ``python -m app`` process on a free port; its log is shown if it fails."""
    photos = _photos(workdir / "collection")
    port = _free_port()
    log = (workdir / "app.log").open("w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "GRADIO_TEMP_DIR": str(workdir / "gradio")}
    proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), "--no-prepare",
                             "--adapter-dir", str(ROOT / "adapters"),
                             "--collection", f"folder:{photos['chelsea'].parent}",
                             "--index-dir", str(workdir / "indexes")],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode}:\n{_tail(workdir / 'app.log')}")
            if time.time() - t0 > 120:
                pytest.fail(f"the app did not answer within 120 s:\n{_tail(workdir / 'app.log')}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="module")
def page(app_url: str) -> Iterator:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        sync_api.expect.set_options(timeout=TIMEOUT_MS)  # a result on a busy 2-core machine, not 5 s
        remote: list[str] = []
        page.on("request", lambda r: remote.append(r.url) if not r.url.startswith(app_url) else None)
        # Not "networkidle": while indexes build, the page polls their progress every second.
        page.goto(app_url, wait_until="load")
        sync_api.expect(page.locator("#adapter-info")).to_contain_text("trained with")
        yield page
        browser.close()
        assert not [u for u in remote if not u.startswith(("data:", "blob:"))], \
            f"the page fetched from outside the server: {remote[:5]}"


@pytest.fixture(scope="module")
def shots(workdir: Path) -> Path:
    out = Path(os.environ.get("RADAPTER_SCREENSHOTS") or workdir / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _screenshot(page, out: Path, name: str) -> None:
    """A full-page screenshot, downscaled and palette-compressed (README-sized PNG)."""
    from PIL import Image

    raw = out / f"{name}.raw.png"
    page.screenshot(path=str(raw), full_page=True)
    with Image.open(raw) as img:
        img = img.convert("RGB")
        img.thumbnail((960, 2000))
        img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out / f"{name}.png", optimize=True)
    raw.unlink()


def _alpha(page, elem_id: str = "alpha") -> float:
    return float(page.locator(f"#{elem_id} input[type=number]").input_value())


def _set_alpha(page, value: float, elem_id: str = "alpha") -> None:
    """Type ``value`` into the slider's number box and leave it, as a user does: Gradio fires the
    slider's release event, whatever the page's scroll position or layout."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(f"{value:g}")
    box.press("Enter")
    box.blur()


def _alpha_used(alpha: float) -> re.Pattern[str]:
    """What a result's note says about its alpha: ``alpha used: <alpha>``."""
    return re.compile(rf"alpha used: \**{re.escape(f'{alpha:g}')}\b")


def _wait_note(page, elem_id: str, alpha: float) -> str:
    """Wait until a result's note states ``alpha used: <alpha>`` and return the note."""
    sync_api.expect(page.locator(f"#{elem_id}")).to_contain_text(_alpha_used(alpha))
    return page.locator(f"#{elem_id}").inner_text()


def _submit(page, tab: str, prefix: str, photo: str, classes: str) -> None:
    """Open ``tab``, upload ``photo``, type the class names and press the tab's button."""
    page.get_by_role("tab", name=tab).click()
    page.locator(f"#{prefix}-image input[type=file]").set_input_files(photo)
    page.locator(f"#{prefix}-classes textarea").fill(classes)
    page.locator(f"#{prefix}-button").click()


def _error_toast(page, text: str) -> None:
    """The UI shows ``text`` as an error message (then the toasts are closed)."""
    sync_api.expect(page.locator(".toast-body").filter(has_text=text).first).to_be_visible()
    for close in page.locator(".toast-close").all():
        close.click()


def test_every_tab_in_chromium(page, workdir: Path, shots: Path) -> None:
    photo = str(workdir / "collection" / "chelsea.png")
    sync_api.expect(page.locator("#adapter-info"), "no shipped adapter in adapters/ fits the default model "
                    "(the app skips them; see the log)").to_contain_text("trained with")
    sync_api.expect(page.locator("#header")).to_contain_text("effnet-lite0-minilm-lit")
    sync_api.expect(page.locator("#header")).to_contain_text("not OpenAI CLIP")

    # Classify, then move the slider: the release re-classifies at the new alpha.
    _submit(page, "Classify", "classify", photo, "cat, dog, rocket, coffee cup")
    before = _alpha(page)
    _wait_note(page, "classify-note", before)
    sync_api.expect(page.locator("#classify-merged")).to_contain_text("cat")
    after = 0.3 if before != 0.3 else 0.35
    _set_alpha(page, after)
    assert _alpha(page) == after
    _wait_note(page, "classify-note", after)
    sync_api.expect(page.locator("#classify-merged")).to_contain_text("cat")
    _screenshot(page, shots, "classify")

    # Retrieve: the index grid builds in the background; a search waits for the first index
    # (never an error), the status line follows the build by itself, the answer names its alpha.
    page.get_by_role("tab", name="Retrieve").click()
    sync_api.expect(page.locator("#retrieve-status")).to_contain_text("Collection:")
    page.locator("#retrieve-query textarea").fill("a cat")
    r_alpha = _alpha(page, "retrieve-alpha")
    page.locator("#retrieve-text-button").click()
    _wait_note(page, "retrieve-note", r_alpha)
    note = page.locator("#retrieve-note").inner_text()
    assert re.search(r"index built at alpha = [\d.]+", note), note
    assert not page.locator(".toast-body").count(), "a search while the index builds must not be an error"
    sync_api.expect(page.locator("#retrieve-gallery img").first).to_be_visible()
    sync_api.expect(page.locator("#retrieve-status")).to_contain_text("ready", timeout=120_000)
    sync_api.expect(page.locator("#retrieve-gallery")).to_contain_text("cos ")  # a cosine, not a "%"
    _screenshot(page, shots, "retrieve")

    # Segment: annotated masks; a slider release on this tab segments again at the new alpha.
    _submit(page, "Segment", "segment", photo, "cat, coffee cup")
    note = _wait_note(page, "segment-note", after)
    assert "classes found" in note
    sync_api.expect(page.locator("#segment-masks img").first).to_be_visible()
    _set_alpha(page, 0.6)
    _wait_note(page, "segment-note", 0.6)
    after = 0.6
    _screenshot(page, shots, "segment")

    # OOD inspection: a corruption, the three models before/after, the sweep plot with alpha marked.
    _submit(page, "OOD inspection", "ood", photo, "cat, dog, rocket, coffee cup")
    note = _wait_note(page, "ood-note", after)
    assert "merged" in note and "shifted" in note, note  # the before/after table
    sync_api.expect(page.locator("#ood-shifted img").first).to_be_visible()
    sync_api.expect(page.locator("#ood-plot img").first).to_be_visible()

    # The background shift: the visitor's own photo pasted onto a background, the three models on both.
    page.locator("#shift-upload input[type=file]").set_input_files(photo)
    page.locator("#shift-button").click()
    note = _wait_note(page, "shift-note", after)
    assert "your image" in note and "zero-shot" in note and "merged" in note, note
    sync_api.expect(page.locator("#shift-right img").first).to_be_visible()
    _screenshot(page, shots, "ood")

    # Switching adapter: the slider shows the new adapter's alpha and the open tab is redone with it.
    page.locator("#adapter input").click()
    page.get_by_role("option", name="emoji-backgrounds-drm").click()
    sync_api.expect(page.locator("#adapter-info")).to_contain_text("emoji-backgrounds-drm")
    sync_api.expect(page.locator("#shift-note")).to_contain_text("emoji-backgrounds-drm")
    switched = _alpha(page)
    _wait_note(page, "shift-note", switched)
    _wait_note(page, "ood-note", switched)
    sync_api.expect(page.locator("#beta")).to_be_visible()  # a DRM adapter: its beta slider shows
    log = (workdir / "app.log").read_text(errors="replace")
    assert "Traceback" not in log, _tail(workdir / "app.log")


def test_bad_input_is_a_message_in_the_ui(page, workdir: Path) -> None:
    page.get_by_role("tab", name="Classify").click()
    page.locator("#classify-image input[type=file]").set_input_files(str(workdir / "collection" / "coffee.png"))
    page.locator("#classify-classes textarea").fill(" , ")
    page.locator("#classify-button").click()
    _error_toast(page, "Type at least one class name")
    page.locator("#classify-classes textarea").fill(", ".join(f"class {i}" for i in range(200)))
    page.locator("#classify-button").click()
    _error_toast(page, "200 classes is too many")
    corrupt = workdir / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    page.locator("#classify-image input[type=file]").set_input_files(str(corrupt))
    page.locator("#classify-classes textarea").fill("cat, dog")
    page.locator("#classify-button").click()
    _error_toast(page, "not an image, or it is corrupt")
    log = (workdir / "app.log").read_text(errors="replace")
    assert "ComponentProcessingError" not in log and "Something went wrong" not in log, _tail(workdir / "app.log")
    # A visitor's mistake is one log line, not a traceback.
    assert "Traceback" not in log and "classify: Type at least one class name" in log, _tail(workdir / "app.log")
