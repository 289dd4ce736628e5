"""The Gradio interface: Classify, Retrieve, Segment and OOD inspection, with one alpha slider.

Every handler receives the session's own alpha (the slider value applied on release), so
concurrent users at different alphas never see each other's results. Bad input becomes a
one-line message in the UI (``gr.Error``), never a stack trace.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from radapter.data.benchmark_spec import get_spec
from radapter.errors import RAdapterError
from radapter.evaluation import plot_alpha_sweep

from .examples import Examples
from .heads import ALPHA_STEP
from .retrieval import RetrievalService
from .service import NOT_AN_IMAGE, InputError, ModelService, as_rgb_array, check_alpha, parse_classnames
from .shift import CORRUPTIONS, apply_corruption

log = logging.getLogger(__name__)
BENCHMARK_CLASSES = {name: ", ".join(get_spec(name).prompt_names) for name in ("fmnist", "digits", "emoji")}


def friendly(fn: Callable) -> Callable:
    """Turn input and library errors into a message in the UI, and log anything unexpected."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (InputError, RAdapterError, ValueError) as e:
            raise gr.Error(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except gr.Error:
            raise
        except Exception:
            log.exception("handler %s failed", fn.__name__)
            raise gr.Error("Something went wrong on the server; the error is in the server log.") from None
    return wrapper


def image_input(**kwargs: Any) -> gr.Image:
    """An image input that hands its handler the uploaded file's path, undecoded.

    ``gr.Image`` decodes uploads before the handler runs, so a corrupt file became a bare
    "Error" in the UI and a stack trace in the log; ``as_rgb_array`` decodes it instead and
    says what is wrong. An instance override, not a subclass: Gradio writes a ``.pyi`` stub
    next to the source file of every Component subclass.
    """
    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    gradio_preprocess = image.preprocess

    def preprocess(payload: Any) -> str | None:
        if payload is not None and payload.path is not None and not (payload.url or "").startswith("data:"):
            return str(payload.path)  # a file Gradio has already accepted into its upload cache
        try:
            return gradio_preprocess(payload)  # base64 data (API clients): Gradio decodes it to a file
        except gr.Error:
            raise
        except Exception:
            raise gr.Error(NOT_AN_IMAGE) from None

    image.preprocess = preprocess
    return image


def build_ui(service: ModelService, retrieval: RetrievalService | None, examples: Examples) -> gr.Blocks:
    adapters = service.adapter_names()
    first = adapters[0]
    first_alpha = service.adapters[first].default_alpha if first in service.adapters else 0.0

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
        arr, names, alpha = as_rgb_array(image), parse_classnames(classes), check_alpha(alpha)
        res = service.compare(arr, names, adapter, alpha, beta=beta)
        return res["zero-shot"], res["fine-tuned"], res["merged"], f"alpha used: **{alpha:g}**"

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
        arr, names, alpha = as_rgb_array(image, max_side=512), parse_classnames(classes), check_alpha(alpha)
        if len(names) > 20:
            raise InputError("Segmentation takes at most 20 class names.")
        seg = service.segment(arr, names, adapter, alpha)
        found = ", ".join(f"{n} ({100 * m.mean():.0f}%)" for n, m in seg.masks().items() if m.any()) or "none"
        return (arr, seg.annotations()), f"alpha used: **{alpha:g}**; classes found: {found}"

    @friendly
    def inspect(image, classes: str, corruption: str, severity: int, adapter: str, alpha: float, beta: float):
        arr, names, alpha = as_rgb_array(image, max_side=512), parse_classnames(classes), check_alpha(alpha)
        shifted = apply_corruption(arr, corruption, int(severity))
        before = service.compare(arr, names, adapter, alpha, beta=beta)
        after = service.compare(shifted, names, adapter, alpha, beta=beta)
        rows = [f"| {k} | {_top(before[k])} | {_top(after[k])} |" for k in ("zero-shot", "fine-tuned", "merged")]
        table = "| model | original | shifted |\n|---|---|---|\n" + "\n".join(rows)
        return shifted, after["zero-shot"], after["fine-tuned"], after["merged"], \
            f"alpha used: **{alpha:g}**\n\n{table}"

    @friendly
    def emoji_pair(name: str):
        pair = examples.emoji_pair(name)
        if pair is None:
            raise InputError("Emoji examples need the prepared emoji benchmark: "
                             "python -m radapter.data.prepare emoji")
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

    with gr.Blocks(title="radapter: robust fine-tuning, inspected") as demo:
        gr.Markdown(f"# radapter\nModel: **{service.model_name}** - zero-shot vs fine-tuned vs merged at alpha. "
                    "Move the alpha slider and release it: every next result uses the new alpha.")
        with gr.Row():
            adapter = gr.Dropdown(adapters, value=first, label="Adapter (server-side files)")
            alpha = gr.Slider(0.0, 1.0, value=first_alpha, step=ALPHA_STEP, elem_id="alpha",
                              label="alpha (0 = zero-shot, 1 = fine-tuned)")
            beta = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="DRM beta (DRM adapters only)")
        info = gr.Markdown(adapter_info(first), elem_id="adapter-info")

        with gr.Tab("Classify"):
            with gr.Row():
                with gr.Column():
                    c_image = image_input(label="Image", sources=["upload", "clipboard"], elem_id="classify-image")
                    c_classes = gr.Textbox(value=BENCHMARK_CLASSES["fmnist"], label="Class names (comma separated)",
                                           elem_id="classify-classes")
                    c_bench = gr.Dropdown(list(BENCHMARK_CLASSES), value=None, label="...or a benchmark's classes")
                    c_button = gr.Button("Classify", variant="primary", elem_id="classify-button")
                    gr.Examples(examples.classify_examples(), inputs=[c_image, c_classes])
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
            with gr.Row():
                with gr.Column():
                    o_image = image_input(label="Image", elem_id="ood-image")
                    o_classes = gr.Textbox(value=BENCHMARK_CLASSES["fmnist"], label="Class names",
                                           elem_id="ood-classes")
                    o_corruption = gr.Dropdown(CORRUPTIONS, value="gaussian_noise", label="Corruption")
                    o_severity = gr.Slider(1, 5, value=3, step=1, label="Severity")
                    o_button = gr.Button("Shift and compare", variant="primary", elem_id="ood-button")
                    gr.Examples(examples.classify_examples(), inputs=[o_image, o_classes])
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
                    o_plot = gr.Image(label="ID / OOD accuracy vs alpha of this adapter",
                                      value=plot(first, first_alpha), elem_id="ood-plot")

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
            return gr.update(value=a), adapter_info(name), plot(name, a), \
                retrieval.status(name) if retrieval else "Retrieval is off."

        adapter.change(on_adapter, adapter, [alpha, info, o_plot, r_status], api_name="select_adapter")
        demo.load(lambda name: retrieval.status(name) if retrieval else "Retrieval is off.", adapter, r_status,
                  api_name=False)
    return demo


def _top(probs: dict[str, float]) -> str:
    name, p = max(probs.items(), key=lambda kv: kv[1])
    return f"{name} ({100 * p:.0f}%)"

