"""The Gradio interface: Classify, Retrieve, Segment and OOD inspection, with one alpha slider.

Every handler receives the session's own alpha (the slider value applied on release), so
concurrent users at different alphas never see each other's results. Bad input becomes a
one-line message in the UI (``gr.Error``), never a stack trace: the image inputs and the
numeric sliders check what an API client sends before the handler runs (``image_input``,
``checked_slider``), and the handlers check the rest.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import ImageData
from pydantic import ConfigDict, ValidationError

from radapter.data.benchmark_spec import get_spec
from radapter.errors import RAdapterError
from radapter.evaluation import plot_alpha_sweep

from .backgrounds import BackgroundShift
from .examples import Examples
from .heads import ALPHA_STEP
from .limits import ImageLimitError, data_url_to_file
from .retrieval import RetrievalService
from .service import (
    InputError,
    ModelService,
    as_rgb_array,
    check_alpha,
    check_beta,
    check_severity,
    split_classnames,
)
from .shift import CORRUPTIONS, apply_corruption

log = logging.getLogger(__name__)
BENCHMARK_CLASSES = {name: ", ".join(get_spec(name).prompt_names)
                     for name in ("emoji-backgrounds", "fmnist", "digits", "emoji")}
NO_IMAGE = "That is not an image: send an uploaded file's path or a data:image/...;base64 URL."


def friendly(fn: Callable) -> Callable:
    """Turn input and library errors into a message in the UI, and log anything unexpected."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:  # a ValueError too: already a message (from a nested handler), not to wrap again
            raise
        except (InputError, RAdapterError, ValueError) as e:
            raise gr.Error(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except Exception:
            log.exception("handler %s failed", fn.__name__)
            raise gr.Error("Something went wrong on the server; the error is in the server log.") from None
    return wrapper


class _ImagePayload(ImageData):
    """Gradio's ``ImageData`` (the same API schema) whose validation failure is a message.

    Gradio validates an input's JSON against its component's data model before
    ``preprocess`` runs, and a string or a number sent as the image fails there without one.
    """

    model_config = ConfigDict(title="ImageData")

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> _ImagePayload:
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError:
            raise gr.Error(NO_IMAGE) from None


def image_input(**kwargs: Any) -> gr.Image:
    """An image input that hands its handler a file path, the image undecoded.

    ``gr.Image`` decodes its input before the handler runs (a corrupt upload is a bare
    "Error", a ``data:`` URL is decoded whole, whatever its size), so the handler decodes
    it instead with ``as_rgb_array``, which checks the file's size and the pixel count in its
    header first and says what is wrong. An uploaded file is handed on as its path; a
    ``data:`` URL (API clients) is written to Gradio's cache as bytes, refused over the byte
    limit before it is decoded from base64 (``limits.data_url_to_file``). Instance overrides,
    not a subclass: Gradio writes a ``.pyi`` stub next to the source file of every Component
    subclass.
    """
    image = gr.Image(type="filepath", image_mode=None, **kwargs)

    def preprocess(payload: Any) -> str | None:
        if payload is None:
            return None
        if (payload.url or "").startswith("data:"):
            try:
                return data_url_to_file(payload.url, image.GRADIO_CACHE)
            except ImageLimitError as e:
                raise gr.Error(str(e)) from None
        if payload.path is not None:
            return str(payload.path)  # a file Gradio has already accepted into its upload cache
        raise gr.Error(NO_IMAGE)

    image.data_model = _ImagePayload
    image.preprocess = preprocess
    return image


def checked_slider(check: Callable[[Any], float], minimum: float, maximum: float, **kwargs: Any) -> gr.Slider:
    """A slider whose value is checked by ``check`` (e.g. ``check_alpha``) before any handler runs.

    ``gr.Slider``'s own bounds check fails on text or ``null`` without a message and lets NaN
    through; ``check`` answers every bad value with one sentence.
    """
    slider = gr.Slider(minimum, maximum, **kwargs)

    def preprocess(payload: Any) -> float:
        try:
            return check(payload)
        except InputError as e:
            raise gr.Error(str(e)) from None

    slider.preprocess = preprocess
    return slider


def _merged(duplicates: list[str]) -> str:
    """The note's clause on class names given more than once (they are merged)."""
    return f"; duplicate class names merged: {', '.join(duplicates)}" if duplicates else ""


def _verdict(probs: dict[str, float], truth: str | None) -> str:
    """The top class (``_top``), marked right or wrong when the true class is known."""
    mark = "" if truth is None else (" ✓" if max(probs, key=probs.get) == truth else " ✗")
    return _top(probs) + mark


def build_ui(service: ModelService, retrieval: RetrievalService | None, examples: Examples) -> gr.Blocks:
    adapters = service.adapter_names()
    first = adapters[0]
    first_alpha = service.adapters[first].default_alpha if first in service.adapters else 0.0
    shift = BackgroundShift(examples.data)
    shift_emoji = shift.emoji_names()

    def is_drm(adapter: str) -> bool:
        entry = service.adapters.get(adapter)
        return entry is not None and entry.drm is not None

    def adapter_classes(adapter: str) -> str:
        """The class list of the benchmark the adapter was trained on (fmnist's for none)."""
        entry = service.adapters.get(adapter)
        bench = (entry.info.get("training", {}).get("benchmark") if entry else None) or "fmnist"
        return BENCHMARK_CLASSES.get(bench, BENCHMARK_CLASSES["fmnist"])

    def adapter_info(adapter: str) -> str:
        entry = service.adapters.get(adapter)
        if entry is None:
            return "No adapter: every result is the zero-shot model."
        t = entry.info.get("training", {})
        drm = " DRM adapter: beta mixes its default and description heads." if entry.drm else ""
        return (f"**{adapter}**: trained with {t.get('method', '?')} on {t.get('benchmark') or 'user data'} "
                f"({t.get('steps', '?')} steps); default alpha {entry.default_alpha:g}.{drm}")

    @friendly
    def classify(image, classes: str, adapter: str, alpha: float, beta: float):
        alpha, beta = check_alpha(alpha), check_beta(beta)
        arr, (names, repeated) = as_rgb_array(image), split_classnames(classes)
        res = service.compare(arr, names, adapter, alpha, beta=beta)
        return res["zero-shot"], res["fine-tuned"], res["merged"], f"alpha used: **{alpha:g}**{_merged(repeated)}"

    @friendly
    def search_text(query: str, adapter: str, alpha: float):
        if retrieval is None:
            raise InputError("Retrieval is off: the server has no collection configured.")
        if not query or not query.strip():
            raise InputError("Type a text query.")
        ans = retrieval.search(query.strip()[:200], "text->image", adapter, check_alpha(alpha))
        return ans.items, f"alpha used: {alpha:g}; {ans.message}"

    @friendly
    def search_image(image, adapter: str, alpha: float):
        if retrieval is None:
            raise InputError("Retrieval is off: the server has no collection configured.")
        arr, alpha = as_rgb_array(image), check_alpha(alpha)
        images = retrieval.search(arr, "image->image", adapter, alpha)
        texts = retrieval.search(arr, "image->text", adapter, alpha)
        labels = {f"{t} ": float(s) for t, s in texts.items}
        return images.items, labels, f"alpha used: {alpha:g}; {images.message}"

    @friendly
    def segment(image, classes: str, adapter: str, alpha: float):
        alpha = check_alpha(alpha)
        arr, (names, repeated) = as_rgb_array(image, max_side=512), split_classnames(classes)
        if len(names) > 20:
            raise InputError("Segmentation takes at most 20 class names.")
        seg = service.segment(arr, names, adapter, alpha)
        found = ", ".join(f"{n} ({100 * m.mean():.0f}%)" for n, m in seg.masks().items() if m.any()) or "none"
        return (arr, seg.annotations()), f"alpha used: **{alpha:g}**; classes found: {found}{_merged(repeated)}"

    @friendly
    def inspect(image, classes: str, corruption: str, severity: int, adapter: str, alpha: float, beta: float):
        alpha, beta, severity = check_alpha(alpha), check_beta(beta), check_severity(severity)
        arr, (names, repeated) = as_rgb_array(image, max_side=512), split_classnames(classes)
        shifted = apply_corruption(arr, corruption, severity)
        before = service.compare(arr, names, adapter, alpha, beta=beta)
        after = service.compare(shifted, names, adapter, alpha, beta=beta)
        rows = [f"| {k} | {_top(before[k])} | {_top(after[k])} |" for k in ("zero-shot", "fine-tuned", "merged")]
        table = "| model | original | shifted |\n|---|---|---|\n" + "\n".join(rows)
        return shifted, after["zero-shot"], after["fine-tuned"], after["merged"], \
            f"alpha used: **{alpha:g}**{_merged(repeated)}\n\n{table}"

    @friendly
    def background_shift(emoji: str | None, background: str | None, upload, adapter: str, alpha: float,
                         beta: float):
        """Classify an image on its training background and on another, by the three models."""
        alpha, beta = check_alpha(alpha), check_beta(beta)
        if not background:
            raise InputError("Pick a background first.")
        if upload is not None:
            left = as_rgb_array(upload, max_side=512)
            right, truth = shift.paste(left, background), None
            heads = ("your image", f"on {background}")
        else:
            if not emoji:
                raise InputError("Pick an emoji from the list (or upload your own image).")
            left, right, truth, own = shift.emoji_pair(emoji, background)
            heads = (f"on {own} (its training background)", f"on {background}")
        before = service.compare(left, shift.classnames, adapter, alpha, beta=beta)
        after = service.compare(right, shift.classnames, adapter, alpha, beta=beta)
        rows = [f"| {k} ({which}) | {_verdict(before[k], truth)} | {_verdict(after[k], truth)} |"
                for k, which in (("zero-shot", "alpha 0"), ("fine-tuned", "alpha 1"), ("merged", f"alpha {alpha:g}"))]
        table = f"| model | {heads[0]} | {heads[1]} |\n|---|---|---|\n" + "\n".join(rows)
        head = f"alpha used: **{alpha:g}**" + (f"; true class: **{truth}**" if truth else "")
        return left, right, f"{head}\n\n{table}"

    @friendly
    def emoji_pair(name: str | None):
        if not examples.emoji_names():
            raise InputError("Emoji examples need the prepared emoji benchmark: "
                             "python -m radapter.data.prepare emoji")
        if not name:
            raise InputError("Pick an emoji from the list first.")
        pair = examples.emoji_pair(name)
        if pair is None:
            raise InputError(f"Unknown emoji {name!r}: pick one from the list.")
        return pair[0], pair[1]

    plots: dict[tuple[str, float], str] = {}
    plot_dir = Path(tempfile.mkdtemp(prefix="radapter-plots-"))  # per process: another server's sweep may differ

    def plot(adapter: str, alpha: float):
        """The adapter's accuracy-vs-alpha curve with ``alpha`` marked (rendered once per alpha)."""
        entry = service.adapters.get(adapter)
        if entry is None or not entry.sweep:
            return None
        key = (adapter, round(float(alpha), 4))
        if key not in plots:
            plots[key] = str(plot_alpha_sweep(entry.sweep, plot_dir / f"{adapter}-{key[1]:.4f}.png",
                                              current_alpha=key[1]))
        return plots[key]

    classify_examples = examples.classify_examples()
    with gr.Blocks(title="radapter: robust fine-tuning, inspected") as demo:
        gr.Markdown(f"# radapter\nModel: **{service.model_name}** - zero-shot vs fine-tuned vs merged at alpha. "
                    "Move the alpha slider and release it: every next result uses the new alpha.")
        with gr.Row():
            adapter = gr.Dropdown(adapters, value=first, label="Adapter (server-side files)")
            alpha = checked_slider(check_alpha, 0.0, 1.0, value=first_alpha, step=ALPHA_STEP, elem_id="alpha",
                                   label="alpha (0 = zero-shot, 1 = fine-tuned)")
            beta = checked_slider(check_beta, 0.0, 1.0, value=0.5, step=0.05, elem_id="beta",
                                  label="DRM beta: 1 = default head, 0 = description head", visible=is_drm(first))
        info = gr.Markdown(adapter_info(first), elem_id="adapter-info")

        with gr.Tab("Classify"):
            with gr.Row():
                with gr.Column():
                    c_image = image_input(label="Image", sources=["upload", "clipboard"], elem_id="classify-image")
                    c_classes = gr.Textbox(value=adapter_classes(first), label="Class names (comma separated)",
                                           elem_id="classify-classes")
                    c_bench = gr.Dropdown(list(BENCHMARK_CLASSES), value=None, label="...or a benchmark's classes")
                    c_button = gr.Button("Classify", variant="primary", elem_id="classify-button")
                    gr.Examples(classify_examples, inputs=[c_image, c_classes])
                with gr.Column():
                    c_zs, c_ft, c_merged = (
                        gr.Label(num_top_classes=5, label=f"{name} ({which})", elem_id=f"classify-{name}")
                        for name, which in (("zero-shot", "alpha 0"), ("fine-tuned", "alpha 1"),
                                            ("merged", "your alpha")))
                    c_alpha = gr.Markdown(elem_id="classify-note")
        with gr.Tab("Retrieve"):
            r_status = gr.Markdown(retrieval.status(first) if retrieval else "Retrieval is off.")
            with gr.Row():
                with gr.Column():
                    r_query = gr.Textbox(label="Text query", value="a red heart", elem_id="retrieve-query")
                    r_text_button = gr.Button("Search images", variant="primary", elem_id="retrieve-text-button")
                    r_image = image_input(label="...or an image query")
                    r_image_button = gr.Button("Search images and captions")
                with gr.Column():
                    r_gallery = gr.Gallery(label="Results", columns=4, height="auto", elem_id="retrieve-gallery")
                    r_texts = gr.Label(num_top_classes=8, label="Captions (image query)")
                    r_note = gr.Markdown(elem_id="retrieve-note")
        with gr.Tab("Segment"):
            with gr.Row():
                with gr.Column():
                    s_image = image_input(label="Image", elem_id="segment-image")
                    s_classes = gr.Textbox(label="Class names (comma separated)", value="cat, coffee cup",
                                           elem_id="segment-classes")
                    s_button = gr.Button("Segment", variant="primary", elem_id="segment-button")
                    gr.Examples(examples.segment_examples(), inputs=[s_image, s_classes])
                with gr.Column():
                    s_out = gr.AnnotatedImage(label="Masks", elem_id="segment-masks")
                    s_note = gr.Markdown(elem_id="segment-note")
        with gr.Tab("OOD inspection"):
            gr.Markdown("### Background shift (the emoji-backgrounds benchmark)\n"
                        "In training, each class sat on its own background 95% of the time; a fine-tuned model "
                        "learns the background as a shortcut, the zero-shot model never saw it. Put an unseen "
                        "emoji on another background and drag alpha: look for the alpha where the merged model "
                        "keeps most of the fine-tuned accuracy on the training background and most of the "
                        "zero-shot robustness on the new one (the curve below marks your alpha).")
            with gr.Row():
                with gr.Column():
                    first_emoji = shift_emoji[0] if shift_emoji else None
                    b_emoji = gr.Dropdown(shift_emoji, value=first_emoji,
                                          label="Emoji (test split: never trained on)", elem_id="shift-emoji")
                    b_background = gr.Dropdown(list(shift.backgrounds), value=shift.conflicting(first_emoji),
                                               label="Background to move it onto", elem_id="shift-background")
                    b_upload = image_input(label="...or your own image, pasted onto that background",
                                           elem_id="shift-upload")
                    b_button = gr.Button("Compare on both backgrounds", variant="primary", elem_id="shift-button")
                with gr.Column():
                    with gr.Row():
                        b_left = gr.Image(label="before: on its training background (or your image)", type="numpy",
                                          elem_id="shift-left")
                        b_right = gr.Image(label="after: on the chosen background", type="numpy",
                                           elem_id="shift-right")
                    b_note = gr.Markdown(elem_id="shift-note")
                    # No label: Gradio draws it over the image's top edge, where the plot's title is.
                    o_plot = gr.Image(label="ID / OOD accuracy vs alpha of this adapter", show_label=False,
                                      elem_id="ood-plot")
            gr.Markdown("### Corruptions and drawing styles")
            with gr.Row():
                with gr.Column():
                    o_image = image_input(label="Image", elem_id="ood-image")
                    o_classes = gr.Textbox(value=adapter_classes(first), label="Class names",
                                           elem_id="ood-classes")
                    o_corruption = gr.Dropdown(CORRUPTIONS, value="gaussian_noise", label="Corruption")
                    o_severity = checked_slider(check_severity, 1, 5, value=3, step=1, label="Severity")
                    o_button = gr.Button("Shift and compare", variant="primary", elem_id="ood-button")
                    gr.Examples(classify_examples, inputs=[o_image, o_classes])
                    with gr.Accordion("The other emoji style", open=False):
                        o_emoji = gr.Dropdown(examples.emoji_names(), label="Emoji (test split)")
                        o_pair = gr.Button("Show Google and Twitter styles")
                        with gr.Row():
                            o_google = gr.Image(label="Google (ID)", type="numpy")
                            o_twitter = gr.Image(label="Twitter (OOD)", type="numpy")
                with gr.Column():
                    o_shifted = gr.Image(label="Shifted input", type="numpy", elem_id="ood-shifted")
                    o_zs, o_ft, o_merged = (gr.Label(num_top_classes=3, label=f"{t} on the shifted input") for t in
                                            ("zero-shot", "fine-tuned", "merged"))
                    o_note = gr.Markdown(elem_id="ood-note")

        c_args = [c_image, c_classes, adapter, alpha, beta]
        c_outs = [c_zs, c_ft, c_merged, c_alpha]
        c_button.click(classify, c_args, c_outs, api_name="classify")
        c_bench.change(lambda b: BENCHMARK_CLASSES.get(b, ""), c_bench, c_classes, api_name="benchmark_classes")
        r_text_button.click(search_text, [r_query, adapter, alpha], [r_gallery, r_note], api_name="search_text")
        r_image_button.click(search_image, [r_image, adapter, alpha], [r_gallery, r_texts, r_note],
                             api_name="search_image")
        s_button.click(segment, [s_image, s_classes, adapter, alpha], [s_out, s_note], api_name="segment")
        o_button.click(inspect, [o_image, o_classes, o_corruption, o_severity, adapter, alpha, beta],
                       [o_shifted, o_zs, o_ft, o_merged, o_note], api_name="inspect")
        o_pair.click(emoji_pair, o_emoji, [o_google, o_twitter], api_name="emoji_pair")
        b_button.click(background_shift, [b_emoji, b_background, b_upload, adapter, alpha, beta],
                       [b_left, b_right, b_note], api_name="background_shift")

        @friendly
        def on_release(image, classes, adapter_name, a, b):
            """Refresh the classification at the released alpha (if there is an input).

            Only the merged column moves with alpha; the other two come from the result cache
            when the image and classes are the ones already classified.
            """
            if image is None:
                return gr.skip(), gr.skip(), gr.skip(), f"alpha used: **{check_alpha(a):g}**"
            return classify(image, classes, adapter_name, a, b)

        # The plot follows as a second step, so the classification is shown without waiting for it.
        alpha.release(on_release, c_args, c_outs, api_name="set_alpha").then(
            plot, [adapter, alpha], o_plot, api_name=False, show_progress="hidden")

        def on_adapter(name: str):
            if retrieval is not None:
                retrieval.warm(name)
            entry = service.adapters.get(name)
            a = entry.default_alpha if entry else 0.0
            classes = adapter_classes(name)
            return gr.update(value=a), adapter_info(name), plot(name, a), \
                retrieval.status(name) if retrieval else "Retrieval is off.", classes, classes, \
                gr.update(visible=is_drm(name))

        adapter.change(on_adapter, adapter, [alpha, info, o_plot, r_status, c_classes, o_classes, beta],
                       api_name="select_adapter")
        # The plot is drawn when a page loads (once per alpha), not while the app starts.
        demo.load(lambda name, a: (retrieval.status(name) if retrieval else "Retrieval is off.", plot(name, a)),
                  [adapter, alpha], [r_status, o_plot], api_name=False)
    return demo


def _top(probs: dict[str, float]) -> str:
    name, p = max(probs.items(), key=lambda kv: kv[1])
    return f"{name} ({100 * p:.0f}%)"

