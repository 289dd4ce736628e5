"""The Gradio interface: Classify, Retrieve, Segment and OOD inspection, with one alpha slider.

Every handler receives the session's own alpha (the slider value applied on release), so
concurrent users at different alphas never see each other's results. Bad input becomes a
one-line message in the UI (``gr.Error``), never a stack trace: the image inputs and the
numeric sliders check what an API client sends before the handler runs (``image_input``,
``checked_slider``), and the handlers check the rest.
"""

from __future__ import annotations

import functools
import inspect
import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import ImageData
from pydantic import ConfigDict, ValidationError

from radapter.data.benchmark_spec import get_spec
from radapter.errors import RAdapterError, first_line
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
    check_number,
    check_severity,
    split_classnames,
)
from .shift import CORRUPTIONS, apply_corruption

log = logging.getLogger(__name__)
BENCHMARK_CLASSES = {name: ", ".join(get_spec(name).prompt_names)
                     for name in ("emoji-backgrounds", "fmnist", "digits", "emoji")}
MAX_TOP_K = 32
NO_IMAGE = "That is not an image: send an uploaded file's path or a data:image/...;base64 URL."


def user_error(message: str, where: str = "") -> gr.Error:
    """A message for the page, logged on one line (no traceback: it is the visitor's input, not a bug)."""
    log.info("%s%s", f"{where}: " if where else "", message)
    return gr.Error(message, print_exception=False)


@contextmanager
def _messages(name: str) -> Iterator[None]:
    try:
        yield
    except gr.Error:  # a ValueError too: already a message (from a nested handler), not to wrap again
        raise
    except (InputError, RAdapterError, ValueError) as e:
        raise user_error(first_line(e), name) from None
    except Exception:
        log.exception("handler %s failed", name)
        raise gr.Error("Something went wrong on the server; the error is in the server log.",
                       print_exception=False) from None


def friendly(fn: Callable) -> Callable:
    """Turn input and library errors into a message in the UI, and log anything unexpected.

    Generator handlers (which show progress while they wait) are wrapped as generators.
    """
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with _messages(fn.__name__):
                yield from fn(*args, **kwargs)
        return generator

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _messages(fn.__name__):
            return fn(*args, **kwargs)
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
            raise user_error(NO_IMAGE, "image") from None


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
                raise user_error(str(e), "image") from None
        if payload.path is not None:
            return str(payload.path)  # a file Gradio has already accepted into its upload cache
        raise user_error(NO_IMAGE, "image")

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
            raise user_error(str(e), "slider") from None

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
    shift = BackgroundShift(examples.data)
    shift_emoji = shift.emoji_names()
    r_first = default_retrieval_adapter(service)

    def default_alpha(adapter: str | None) -> float:
        entry = service.adapters.get(adapter or "")
        return entry.default_alpha if entry else 0.0

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

    def used(adapter: str, alpha: float) -> str:
        """What a result was computed with, so it can be checked against the controls."""
        return f"adapter **{adapter}**, alpha used: **{alpha:g}**" if adapter in service.adapters \
            else "the zero-shot model (no alpha)"

    @friendly
    def classify(image, classes: str, adapter: str, alpha: float, beta: float):
        alpha, beta = check_alpha(alpha), check_beta(beta)
        arr, (names, repeated) = as_rgb_array(image), split_classnames(classes)
        res = service.compare(arr, names, adapter, alpha, beta=beta)
        return res["zero-shot"], res["fine-tuned"], res["merged"], f"{used(adapter, alpha)}{_merged(repeated)}"

    def _retrieval_ready(adapter: str) -> Iterator[str]:
        """Progress lines until ``adapter``'s first index exists (none when it already does)."""
        if retrieval is None:
            raise InputError("Retrieval is off: the server has no collection configured.")
        for status in retrieval.wait_for_index(adapter):
            yield f"Waiting for the first index; the search runs as soon as it is ready. {status}"

    @friendly
    def search_text(query: str, adapter: str, alpha: float, k: float):
        if not query or not query.strip():
            raise InputError("Type a text query.")
        alpha, k = check_alpha(alpha), int(check_top_k(k))
        for status in _retrieval_ready(adapter):
            yield gr.skip(), gr.skip(), status, "text"
        ans = retrieval.search(query.strip()[:200], "text->image", adapter, alpha, k)
        yield ans.items, "", f"{used(adapter, alpha)}; {ans.message}", "text"

    @friendly
    def search_image(image, adapter: str, alpha: float, k: float):
        arr, alpha, k = as_rgb_array(image), check_alpha(alpha), int(check_top_k(k))
        for status in _retrieval_ready(adapter):
            yield gr.skip(), gr.skip(), status, "image"
        images = retrieval.search(arr, "image->image", adapter, alpha, k)
        texts = retrieval.search(arr, "image->text", adapter, alpha, k)
        table = "| caption | cosine similarity |\n|---|---|\n" + "\n".join(
            f"| {caption} | {score} |" for caption, score in texts.items)
        yield images.items, table, f"{used(adapter, alpha)}; {images.message}", "image"

    @friendly
    def segment(image, classes: str, adapter: str, alpha: float):
        alpha = check_alpha(alpha)
        arr, (names, repeated) = as_rgb_array(image, max_side=512), split_classnames(classes)
        if len(names) > 20:
            raise InputError("Segmentation takes at most 20 class names.")
        seg = service.segment(arr, names, adapter, alpha)
        found = ", ".join(f"{n} ({100 * m.mean():.0f}%)" for n, m in seg.masks().items() if m.any()) or "none"
        return (arr, seg.annotations()), f"{used(adapter, alpha)}; classes found: {found}{_merged(repeated)}"

    @friendly
    def inspect_shift(image, classes: str, corruption: str, severity: int, adapter: str, alpha: float, beta: float):
        alpha, beta, severity = check_alpha(alpha), check_beta(beta), check_severity(severity)
        arr, (names, repeated) = as_rgb_array(image, max_side=512), split_classnames(classes)
        shifted = apply_corruption(arr, corruption, severity)
        before = service.compare(arr, names, adapter, alpha, beta=beta)
        after = service.compare(shifted, names, adapter, alpha, beta=beta)
        rows = [f"| {k} | {_top(before[k])} | {_top(after[k])} |" for k in ("zero-shot", "fine-tuned", "merged")]
        table = "| model | original | shifted |\n|---|---|---|\n" + "\n".join(rows)
        return shifted, after["zero-shot"], after["fine-tuned"], after["merged"], \
            f"{used(adapter, alpha)}{_merged(repeated)}\n\n{table}"

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
        head = used(adapter, alpha) + (f"; true class: **{truth}**" if truth else "")
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

    def retrieval_status(adapter: str) -> str:
        if retrieval is None:
            return "Retrieval is off: the server has no collection configured."
        return f"Collection: **{retrieval.describe()}**. Adapter **{adapter}**: {retrieval.status(adapter)}."

    classify_examples = examples.classify_examples()
    with gr.Blocks(title="radapter: robust fine-tuning, inspected") as demo:
        gr.Markdown(f"# radapter\nModel: **{service.display_name}**, {service.model_summary()}\n\n"
                    "Zero-shot vs fine-tuned vs merged at alpha. Move the alpha slider and release it: the "
                    "open tab is computed again at the new alpha.", elem_id="header")
        with gr.Row():
            adapter = gr.Dropdown(adapters, value=first, label="Adapter (server-side files)", elem_id="adapter")
            alpha = checked_slider(check_alpha, 0.0, 1.0, value=default_alpha(first), step=ALPHA_STEP, elem_id="alpha",
                                   label="alpha (0 = zero-shot, 1 = fine-tuned)")
            beta = checked_slider(check_beta, 0.0, 1.0, value=0.5, step=0.05, elem_id="beta",
                                  label="DRM beta: 1 = default head, 0 = description head", visible=is_drm(first))
        info = gr.Markdown(adapter_info(first), elem_id="adapter-info")
        active = gr.State("classify")

        with gr.Tabs():
            with gr.Tab("Classify", id="classify") as t_classify:
                with gr.Row():
                    with gr.Column():
                        c_image = image_input(label="Image", sources=["upload", "clipboard"],
                                              elem_id="classify-image")
                        c_classes = gr.Textbox(value=adapter_classes(first), label="Class names (comma separated)",
                                               elem_id="classify-classes")
                        c_bench = gr.Dropdown(list(BENCHMARK_CLASSES), value=None,
                                              label="...or a benchmark's classes")
                        c_button = gr.Button("Classify", variant="primary", elem_id="classify-button")
                        gr.Examples(classify_examples, inputs=[c_image, c_classes])
                    with gr.Column():
                        c_zs, c_ft, c_merged = (
                            gr.Label(num_top_classes=5, label=f"{name} ({which})", elem_id=f"classify-{name}")
                            for name, which in (("zero-shot", "alpha 0"), ("fine-tuned", "alpha 1"),
                                                ("merged", "your alpha")))
                        c_alpha = gr.Markdown(elem_id="classify-note")
            with gr.Tab("Retrieve", id="retrieve") as t_retrieve:
                r_status = gr.Markdown(retrieval_status(r_first), elem_id="retrieve-status")
                with gr.Row():
                    r_adapter = gr.Dropdown(adapters, value=r_first, elem_id="retrieve-adapter",
                                            label="Retrieval adapter (default: the one trained on emoji names)")
                    r_alpha = checked_slider(check_alpha, 0.0, 1.0, value=default_alpha(r_first), step=0.1,
                                             elem_id="retrieve-alpha", label="retrieval alpha (indexes every 0.1)")
                    r_k = checked_slider(check_top_k, 1, MAX_TOP_K, value=8, step=1, elem_id="retrieve-k",
                                         label="results (top-k)")
                with gr.Row():
                    with gr.Column():
                        r_query = gr.Textbox(label="Text query", value="a red heart", elem_id="retrieve-query")
                        r_text_button = gr.Button("Search images", variant="primary",
                                                  elem_id="retrieve-text-button")
                        r_image = image_input(label="...or an image query", elem_id="retrieve-image")
                        r_image_button = gr.Button("Search images and captions", elem_id="retrieve-image-button")
                    with gr.Column():
                        r_gallery = gr.Gallery(label="Results", columns=4, height="auto",
                                               elem_id="retrieve-gallery")
                        r_texts = gr.Markdown(elem_id="retrieve-captions")
                        r_note = gr.Markdown(elem_id="retrieve-note")
                r_mode = gr.State("text")
                r_timer = gr.Timer(1.0, active=False)
            with gr.Tab("Segment", id="segment") as t_segment:
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
            with gr.Tab("OOD inspection", id="ood") as t_ood:
                gr.Markdown("### Background shift (the emoji-backgrounds benchmark)\n"
                            "In training, each class sat on its own background 95% of the time; a fine-tuned "
                            "model learns the background as a shortcut, the zero-shot model never saw it. Put an "
                            "unseen emoji on another background and drag alpha: look for the alpha where the "
                            "merged model keeps most of the fine-tuned accuracy on the training background and "
                            "most of the zero-shot robustness on the new one (the curve below marks your alpha).")
                with gr.Row():
                    with gr.Column():
                        first_emoji = shift_emoji[0] if shift_emoji else None
                        b_emoji = gr.Dropdown(shift_emoji, value=first_emoji,
                                              label="Emoji (test split: never trained on)", elem_id="shift-emoji")
                        b_background = gr.Dropdown(list(shift.backgrounds), value=shift.conflicting(first_emoji),
                                                   label="Background to move it onto", elem_id="shift-background")
                        b_upload = image_input(label="...or your own image, pasted onto that background",
                                               elem_id="shift-upload")
                        b_button = gr.Button("Compare on both backgrounds", variant="primary",
                                             elem_id="shift-button")
                    with gr.Column():
                        with gr.Row():
                            b_left = gr.Image(label="before: on its training background (or your image)",
                                              type="numpy", elem_id="shift-left")
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
                        o_zs, o_ft, o_merged = (gr.Label(num_top_classes=3, label=f"{t} on the shifted input")
                                                for t in ("zero-shot", "fine-tuned", "merged"))
                        o_note = gr.Markdown(elem_id="ood-note")

        c_args = [c_image, c_classes, adapter, alpha, beta]
        c_outs = [c_zs, c_ft, c_merged, c_alpha]
        s_outs = [s_out, s_note]
        o_outs = [o_shifted, o_zs, o_ft, o_merged, o_note]
        b_outs = [b_left, b_right, b_note]
        r_outs = [r_gallery, r_texts, r_note, r_mode]
        r_args = [r_adapter, r_alpha, r_k]
        c_button.click(classify, c_args, c_outs, api_name="classify")
        c_bench.change(lambda b: BENCHMARK_CLASSES.get(b, ""), c_bench, c_classes, api_name="benchmark_classes")
        r_text_button.click(search_text, [r_query, *r_args], r_outs, api_name="search_text")
        r_image_button.click(search_image, [r_image, *r_args], r_outs, api_name="search_image")
        s_button.click(segment, [s_image, s_classes, adapter, alpha], s_outs, api_name="segment")
        o_button.click(inspect_shift, [o_image, o_classes, o_corruption, o_severity, adapter, alpha, beta],
                       o_outs, api_name="inspect")
        o_pair.click(emoji_pair, o_emoji, [o_google, o_twitter], api_name="emoji_pair")
        b_button.click(background_shift, [b_emoji, b_background, b_upload, adapter, alpha, beta], b_outs,
                       api_name="background_shift")
        for tab, tab_id in ((t_classify, "classify"), (t_retrieve, "retrieve"), (t_segment, "segment"),
                            (t_ood, "ood")):
            tab.select(lambda t=tab_id: t, None, active, api_name=False, show_progress="hidden")

        # The open tab follows the controls: a slider release or an adapter switch computes it again
        # (tabs without an input are left alone), so every result on screen matches the controls.
        rerun_args = [active, c_image, c_classes, s_image, s_classes, o_image, o_classes, o_corruption, o_severity,
                      b_emoji, b_background, b_upload, adapter, alpha, beta]
        rerun_outs = [*c_outs, *s_outs, *o_outs, *b_outs]

        def rerun(tab, c_img, c_cls, s_img, s_cls, o_img, o_cls, o_corr, o_sev, b_em, b_bg, b_up, name, a, b):
            out: list[Any] = [gr.skip()] * len(rerun_outs)
            n_c, n_s, n_o = len(c_outs), len(s_outs), len(o_outs)
            if tab == "classify" and c_img is not None:
                out[:n_c] = classify(c_img, c_cls, name, a, b)
            elif tab == "segment" and s_img is not None:
                out[n_c:n_c + n_s] = segment(s_img, s_cls, name, a)
            elif tab == "ood":
                if o_img is not None:
                    out[n_c + n_s:n_c + n_s + n_o] = inspect_shift(o_img, o_cls, o_corr, o_sev, name, a, b)
                if b_up is not None or b_em:
                    out[n_c + n_s + n_o:] = background_shift(b_em, b_bg, b_up, name, a, b)
            return out

        # The plot follows as a second step, so the results are shown without waiting for it.
        for slider in (alpha, beta):
            slider.release(rerun, rerun_args, rerun_outs, api_name=False,
                           ).then(plot, [adapter, alpha], o_plot, api_name=False, show_progress="hidden")

        @friendly
        def set_alpha(image, classes, adapter_name, a, b):
            """The classification at a released alpha, for API clients (``/set_alpha``)."""
            if image is None:
                return gr.skip(), gr.skip(), gr.skip(), f"alpha used: **{check_alpha(a):g}**"
            return classify(image, classes, adapter_name, a, b)

        # An endpoint without a control of its own: the page's release handler above does more.
        gr.Button(visible=False).click(set_alpha, c_args, c_outs, api_name="set_alpha")

        def on_adapter(name: str):
            """The controls of the chosen adapter, and every result cleared (the open tab is then redone)."""
            a = default_alpha(name)
            classes = adapter_classes(name)
            cleared = [None if isinstance(c, gr.Label | gr.Image | gr.AnnotatedImage) else "" for c in rerun_outs]
            return [gr.update(value=a), adapter_info(name), classes, classes, gr.update(visible=is_drm(name)),
                    *cleared]

        # Quick and without a spinner: nothing here waits on a model, so the slider never hides.
        adapter.change(on_adapter, adapter, [alpha, info, c_classes, o_classes, beta, *rerun_outs],
                       api_name="select_adapter", show_progress="hidden",
                       ).then(rerun, rerun_args, rerun_outs, api_name=False,
                              ).then(plot, [adapter, alpha], o_plot, api_name=False, show_progress="hidden")

        def retrieval_tick(name: str):
            building = retrieval is not None and retrieval.building(name)
            return retrieval_status(name), gr.Timer(active=building)

        def on_retrieval_adapter(name: str):
            if retrieval is not None:
                retrieval.warm(name)
            return (gr.update(value=default_alpha(name)), None, "", "", *retrieval_tick(name))

        r_adapter.change(on_retrieval_adapter, r_adapter, [r_alpha, r_gallery, r_texts, r_note, r_status, r_timer],
                         api_name=False, show_progress="hidden")
        r_timer.tick(retrieval_tick, r_adapter, [r_status, r_timer], api_name=False, show_progress="hidden",
                     concurrency_limit=None)

        def retrieval_again(mode: str, query: str, image, name: str, a: float, k: float):
            """A retrieval slider release searches again with the last kind of query."""
            if mode == "image" and image is not None:
                yield from search_image(image, name, a, k)
            elif query and query.strip():
                yield from search_text(query, name, a, k)
            else:
                yield (gr.skip(),) * len(r_outs)

        for slider in (r_alpha, r_k):
            slider.release(retrieval_again, [r_mode, r_query, r_image, *r_args], r_outs, api_name=False)

        def on_load(name: str, a: float, r_name: str):
            if retrieval is not None:
                retrieval.warm(r_name)
            return (plot(name, a), *retrieval_tick(r_name))

        # The plot is drawn when a page loads (once per alpha), not while the app starts.
        demo.load(on_load, [adapter, alpha, r_adapter], [o_plot, r_status, r_timer], api_name=False)
    return demo


def default_retrieval_adapter(service: ModelService) -> str:
    """The first adapter trained for retrieval (``training.task``), else the first adapter."""
    for name, entry in service.adapters.items():
        if entry.info.get("training", {}).get("task") == "retrieval":
            return name
    return service.adapter_names()[0]


def check_top_k(k: Any) -> float:
    """How many results a search returns: a whole number from 1 to ``MAX_TOP_K``."""
    return check_number(k, "top-k", 1, MAX_TOP_K, whole=True)


def _top(probs: dict[str, float]) -> str:
    name, p = max(probs.items(), key=lambda kv: kv[1])
    return f"{name} ({100 * p:.0f}%)"
