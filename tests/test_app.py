import copy
import json
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import radapter
from app.heads import ALPHA_GRID
from app.service import (
    DEFAULT_TEMPLATES,
    NO_ADAPTER,
    InputError,
    ModelService,
    as_rgb_array,
    discover_adapters,
    parse_classnames,
)
from tests.conftest import randomize_adapters, tiny_service


@pytest.fixture
def service(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"nope")
    return tiny_service(tmp_path)


IMAGE = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
CLASSES = ["red square", "green circle", "blue star"]


def test_adapters_come_from_the_server_folder_only(service):
    assert service.adapter_names() == ["colours", NO_ADAPTER]  # the corrupt file is skipped, not fatal
    assert service.adapters["colours"].default_alpha == 0.4
    with pytest.raises(InputError, match="Unknown adapter"):
        service.probabilities(IMAGE, CLASSES, "/etc/passwd", 0.5)


def test_adapters_for_another_base_model_are_skipped(service, tmp_path):
    other = radapter.load_model(radapter.TINY_MODEL)[0]  # another random init: another fingerprint
    radapter.add_adapters(other, radapter.RAdapterConfig())
    radapter.save_adapters(other, tmp_path / "other-base.safetensors")
    fingerprint = radapter.compute_fingerprint(service.base_model)
    assert list(discover_adapters(tmp_path, fingerprint)) == ["colours"]
    assert list(discover_adapters(tmp_path)) == ["colours", "other-base"]  # no fingerprint given: no check


def test_compare_zero_shot_fine_tuned_merged(service):
    res = service.compare(IMAGE, CLASSES, "colours", 0.5)
    assert set(res) == {"zero-shot", "fine-tuned", "merged"}
    base = service.compare(IMAGE, CLASSES, None, 0.5)["zero-shot"]
    assert res["zero-shot"] == pytest.approx(base, abs=1e-5)  # alpha 0 is the pretrained model
    assert res["fine-tuned"] != pytest.approx(res["zero-shot"], abs=1e-4)


def test_concurrent_users_at_different_alphas_get_their_own_results(service):
    alphas = [0.0, 0.3, 0.7, 1.0] * 4
    sequential = {a: service.probabilities(IMAGE, CLASSES, "colours", a) for a in set(alphas)}
    service.clear_caches()  # the concurrent requests must compute, not read the sequential results
    service.compare(IMAGE, ["sun", "moon"], "colours", 0.5)  # the head warmer now runs alongside the users
    results: list[tuple[float, dict]] = []

    def user(a: float) -> None:
        results.append((a, service.probabilities(IMAGE, CLASSES, "colours", a)))

    threads = [threading.Thread(target=user, args=(a,)) for a in alphas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == len(alphas)
    for a, probs in results:
        assert probs == pytest.approx(sequential[a], abs=1e-6)


def _reference_probabilities(service, alpha: float, adapter: str = "colours") -> dict[str, float]:
    """The library's own path: a fresh copy merged at alpha with merge_adapters, zero_shot_classifier."""
    model = copy.deepcopy(service.base_model)
    radapter.load_adapters(model, service.adapters[adapter].path)
    radapter.merge_adapters(model, alpha)
    head = radapter.zero_shot_classifier(model, service.tokenizer, CLASSES, DEFAULT_TEMPLATES)
    with torch.no_grad():
        x = service.preprocess(Image.fromarray(IMAGE)).unsqueeze(0)
        probs = torch.softmax(head(model.eval().encode_image(x)), dim=1)[0]
    return dict(zip(CLASSES, probs.tolist(), strict=True))


def _two_adapter_service(tmp_path):
    torch.manual_seed(0)
    model, preprocess, tok = radapter.load_model(radapter.TINY_MODEL)
    for seed, (name, config) in enumerate([("colours", radapter.RAdapterConfig()),
                                           ("shapes", radapter.RAdapterConfig(rank=4, towers=("image",)))]):
        trained = copy.deepcopy(model)
        radapter.add_adapters(trained, config)
        randomize_adapters(trained, std=0.3, seed=seed + 5)
        radapter.save_adapters(trained, tmp_path / f"{name}.safetensors")
    return ModelService(model, preprocess, tok, discover_adapters(tmp_path), model_name="tiny")


def test_every_adapter_is_a_named_set_on_one_model(tmp_path):
    service = _two_adapter_service(tmp_path)
    colours, shapes = service._slot("colours"), service._slot("shapes")
    assert colours.model is shapes.model and colours.model is not service.base_model  # one copy for all adapters
    assert sorted(radapter.list_adapters(colours.model)) == ["colours", "shapes"]
    assert not radapter.has_adapters(service.base_model)  # the zero-shot slot stays plain
    for adapter, alpha in [("colours", 0.3), ("shapes", 0.8), ("colours", 0.8), ("shapes", 0.0), ("colours", 1.0)]:
        got = service.probabilities(IMAGE, CLASSES, adapter, alpha)
        assert got == pytest.approx(_reference_probabilities(service, alpha, adapter), abs=1e-5), (adapter, alpha)


def test_concurrent_users_on_different_adapters_get_their_own_results(tmp_path):
    service = _two_adapter_service(tmp_path)
    requests = [(a, alpha) for a in ("colours", "shapes", NO_ADAPTER) for alpha in (0.0, 0.4, 1.0)] * 2
    sequential = {r: service.probabilities(IMAGE, CLASSES, *r) for r in set(requests)}
    service.clear_caches()
    results: list[tuple[tuple, dict]] = []

    def user(r: tuple) -> None:
        results.append((r, service.probabilities(IMAGE, CLASSES, *r)))

    threads = [threading.Thread(target=user, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == len(requests)
    for r, probs in results:
        assert probs == pytest.approx(sequential[r], abs=1e-6), r


def test_slider_release_uses_heads_warmed_at_exactly_its_alpha(service, monkeypatch):
    service.compare(IMAGE, CLASSES, "colours", 0.4)
    assert service.wait_for_heads(timeout=60)
    slot = service._slot("colours")
    assert {a for (name, a, _) in service._heads._items if name == "colours"} == set(ALPHA_GRID)

    def no_text(*args, **kwargs):
        raise AssertionError("a slider release must not run the text tower once its head is warm")

    monkeypatch.setattr(slot.model, "encode_text", no_text)  # the shared adapted model
    for alpha in (0.65, 0.05):
        res = service.compare(IMAGE, CLASSES, "colours", alpha)  # what the release handler calls
        assert res["merged"] == pytest.approx(_reference_probabilities(service, alpha), abs=1e-5)
    assert res["zero-shot"] == pytest.approx(_reference_probabilities(service, 0.0), abs=1e-5)
    assert res["fine-tuned"] == pytest.approx(_reference_probabilities(service, 1.0), abs=1e-5)


def test_heads_built_on_demand_equal_warmed_ones(service, tmp_path):
    service.compare(IMAGE, CLASSES, "colours", 0.4)
    assert service.wait_for_heads(timeout=60)
    cold = ModelService(service.base_model, service.preprocess, service.tokenizer, service.adapters,
                        warm_heads=False)
    for alpha in (0.25, 0.9):  # warmed in the background vs built by the request itself
        assert cold.probabilities(IMAGE, CLASSES, "colours", alpha) == service.probabilities(
            IMAGE, CLASSES, "colours", alpha)


def test_bad_inputs_are_clear_messages(tmp_path):
    with pytest.raises(InputError, match="at least one class"):
        parse_classnames(" , ,")
    with pytest.raises(InputError, match="too many"):
        parse_classnames(",".join(f"c{i}" for i in range(200)))
    assert parse_classnames("cat, dog, cat") == ["cat", "dog"]
    with pytest.raises(InputError, match="Upload an image"):
        as_rgb_array(None)
    with pytest.raises(InputError, match="not an image"):
        as_rgb_array("not-an-image.txt")
    assert max(as_rgb_array(np.zeros((3000, 1500, 3), np.uint8)).shape[:2]) == 1024
    # Uploads arrive as file paths and are decoded by the app, so a bad file is a message too.
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InputError, match="not an image, or it is corrupt"):
        as_rgb_array(str(tmp_path / "corrupt.png"))
    Image.fromarray(IMAGE).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt"):
        as_rgb_array(str(tmp_path / "truncated.png"))
    Image.new("1", (10_000, 6_000)).save(tmp_path / "bomb.png")  # a few KB on disk, 60 megapixels decoded
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    with pytest.raises(InputError, match="megapixels"):
        as_rgb_array(str(tmp_path / "bomb.png"))
    Image.new("RGB", (4000, 2000), "red").save(tmp_path / "big.jpg")
    assert as_rgb_array(str(tmp_path / "big.jpg")).shape == (512, 1024, 3)  # downscaled, not refused
    assert np.array_equal(as_rgb_array(str(tmp_path / "ok.png")), IMAGE)


def test_gradio_app_end_to_end(service, tmp_path):
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from gradio_client import Client, handle_file

    from app.examples import Examples
    from app.main import launch
    from app.ui import build_ui

    demo = build_ui(service, None, Examples(tmp_path / "examples", data=tmp_path / "no-data"))
    demo.queue()
    launch(demo, prevent_thread_lock=True, quiet=True)  # as python -m app serves it
    try:
        client = Client(demo.local_url, verbose=False)
        names = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert {"/classify", "/segment", "/inspect", "/search_text", "/set_alpha"} <= set(names)
        Image.fromarray(IMAGE).save(tmp_path / "x.png")
        _, _, merged, note = client.predict(handle_file(str(tmp_path / "x.png")), "red square, blue star",
                                              "colours", 0.3, 0.5, api_name="/classify")
        assert "0.3" in note and {c["label"] for c in merged["confidences"]} == {"red square", "blue star"}
        _, _, released, note = client.predict(handle_file(str(tmp_path / "x.png")), "red square, blue star",
                                              "colours", 0.55, 0.5, api_name="/set_alpha")
        assert "0.55" in note and released != merged  # the merged column moved with alpha
        with pytest.raises(Exception, match="at least one class"):
            client.predict(handle_file(str(tmp_path / "x.png")), " ", "colours", 0.3, 0.5, api_name="/classify")
        (tmp_path / "bad.png").write_bytes(b"not a png")
        with pytest.raises(Exception, match="not an image, or it is corrupt"):
            client.predict(handle_file(str(tmp_path / "bad.png")), "a", "colours", 0.3, 0.5, api_name="/classify")
    finally:
        demo.close()


def test_retrieval_answers_from_the_nearest_alpha_index(service, tmp_path):

    from app.retrieval import RetrievalService
    from indexes.collection import from_folder

    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    retrieval = RetrievalService(service, from_folder(tmp_path), tmp_path / "indexes", alphas=[0.0, 0.5, 1.0])
    retrieval.warm("colours")
    assert retrieval.wait("colours", timeout=120)
    assert retrieval.status("colours") == "indexes ready (3 alphas)"
    ans = retrieval.search("a red square", "text->image", "colours", 0.4)
    assert ans.index_alpha == 0.5 and "alpha = 0.5" in ans.message and "nearest" in ans.message
    assert len(ans.items) == 6
    exact = retrieval.search(IMAGE, "image->image", "colours", 1.0)
    assert exact.index_alpha == 1.0 and "nearest" not in exact.message
    retrieval.warm(NO_ADAPTER)  # the zero-shot model has one index, built in the background
    assert retrieval.wait(NO_ADAPTER, timeout=120)
    base = retrieval.search("a red square", "text->image", NO_ADAPTER, 0.7)
    assert base.index_alpha is None and len(base.items) == 6 and "zero-shot" in base.message


def _held_retrieval(service, tmp_path, alphas, alphas_built: int):
    """A retrieval service whose index build stops in its batch hook once ``alphas_built``
    indexes are built, until the returned event is set (standing in for a long build)."""
    from app.retrieval import RetrievalService
    from indexes.collection import from_folder

    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    retrieval = RetrievalService(service, from_folder(tmp_path), tmp_path / "indexes", alphas=alphas)
    release, held = threading.Event(), threading.Event()
    own = retrieval._on_batch

    def on_batch(progress):
        report = own(progress)

        def hook(part, done, total):
            report(part, done, total)
            if len(progress.built) >= alphas_built:
                held.set()
                assert release.wait(60)
        return hook

    retrieval._on_batch = on_batch
    return retrieval, release, held


def test_building_an_index_never_blocks_classification(service, tmp_path):
    retrieval, release, held = _held_retrieval(service, tmp_path, [0.0, 1.0], 0)
    try:
        retrieval.warm(NO_ADAPTER)  # the zero-shot model's index, on the model zero-shot requests use
        assert held.wait(60) and retrieval.building(NO_ADAPTER)
        done = threading.Event()
        threading.Thread(target=lambda: (service.probabilities(IMAGE, CLASSES, NO_ADAPTER, 0.0), done.set()),
                         daemon=True).start()
        assert done.wait(30), "classification waited for the index build"
        assert "embedding images" in retrieval.status(NO_ADAPTER)
    finally:
        release.set()
    assert retrieval.wait(NO_ADAPTER, 60) and retrieval.status(NO_ADAPTER) == "index ready"


def test_a_search_during_the_build_waits_with_progress_then_answers(service, tmp_path):
    from app.retrieval import IndexNotReady

    retrieval, release, held = _held_retrieval(service, tmp_path, [0.0, 0.5, 1.0], 1)  # hold in the 2nd
    try:
        waiting = retrieval.wait_for_index("colours", timeout=60, every=0.01)
        first = next(waiting)  # nothing is built yet: the wait reports the build
        assert first.startswith("building indexes:")
        list(waiting)  # returns once the first alpha's index is on disk
        assert held.wait(60)
        (built,) = retrieval.progress("colours").built
        todo = next(a for a in (0.0, 0.5, 1.0) if a != built)
        ans = retrieval.search("a red square", "text->image", "colours", todo)
        assert ans.index_alpha == built and len(ans.items) == 6
        assert "building indexes: 1/3 alphas ready" in ans.message  # says the grid is not complete
    finally:
        release.set()
    assert retrieval.wait("colours", 60)
    assert list(retrieval.wait_for_index("colours")) == []  # built: no wait at all
    assert "building" not in retrieval.search("a red square", "text->image", "colours", todo).message

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    retrieval._embedder = broken  # the zero-shot index cannot be built: the wait ends with the reason
    with pytest.raises(IndexNotReady, match="disk full"):
        list(retrieval.wait_for_index(NO_ADAPTER, timeout=60, every=0.01))
    assert retrieval.status(NO_ADAPTER) == "index build failed: disk full"


def _save_png(tmp_path) -> str:
    path = tmp_path / "upload.png"
    Image.fromarray(IMAGE).save(path)
    return str(path)


def test_background_shift_pastes_one_emoji_on_two_backgrounds(tmp_path):
    from app.backgrounds import SHOWN, BackgroundShift
    from tests.test_data_prepare import _fake_prepared_emoji

    with pytest.raises(InputError, match="prepare emoji"):
        BackgroundShift(tmp_path / "empty").emoji_pair("x", "grass")
    _fake_prepared_emoji(tmp_path / "emoji", splits=("test", "train"))
    meta = json.loads((tmp_path / "emoji" / "emoji_meta.json").read_text())
    shift = BackgroundShift(tmp_path)
    names = shift.emoji_names()
    assert names and set(names) == {m["name"] for m in meta if m["split"] == "test"}
    name = names[0]
    other = shift.conflicting(name)
    own_img, new_img, truth, own = shift.emoji_pair(name, other)
    assert truth == name.split()[0] and own != other  # the fake emoji are named after their class
    assert own == shift.training_background(shift.classnames.index(truth))
    assert own_img.shape == new_img.shape == (SHOWN, SHOWN, 3) and not np.array_equal(own_img, new_img)
    again = shift.emoji_pair(name, other)
    assert np.array_equal(again[0], own_img) and np.array_equal(again[1], new_img)  # deterministic
    assert shift.paste(IMAGE, other).shape == (SHOWN, SHOWN, 3)
    with pytest.raises(InputError, match="Unknown background"):
        shift.emoji_pair(name, "moon")
    with pytest.raises(InputError, match="Unknown emoji"):
        shift.emoji_pair("no such emoji", other)


def test_background_shift_in_the_app_names_the_true_class(service, tmp_path):
    from app.examples import Examples
    from app.ui import build_ui
    from tests.test_data_prepare import _fake_prepared_emoji

    _fake_prepared_emoji(tmp_path / "data" / "emoji")  # every fake emoji is in the train split: none to pick
    demo = build_ui(service, None, Examples(tmp_path / "examples", data=tmp_path / "data"))
    beta = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "beta")
    assert beta.visible is False  # "colours" is no DRM adapter: beta would act on nothing
    fn = next(f.fn for f in demo.fns.values() if f.name == "background_shift")
    with pytest.raises(Exception, match="Pick an emoji"):
        fn(None, "grass", None, "colours", 0.5, 0.5)
    left, right, note = fn(None, "grass", _save_png(tmp_path), "colours", 0.5, 0.5)
    assert left.shape[2] == right.shape[2] == 3 and "alpha used: **0.5**" in note
    assert note.count("\n| ") == 4 and "on grass" in note and "true class" not in note  # an upload has none
    assert service.wait_for_heads(timeout=60)  # no warmer thread left running at exit


def test_examples_offer_the_background_benchmark_when_prepared(tmp_path):
    from app.examples import Examples
    from radapter.data.prepare import prepare
    from tests.test_data_prepare import _fake_prepared_emoji

    assert Examples(tmp_path / "ex0", data=tmp_path / "data").background_examples() == []
    _fake_prepared_emoji(tmp_path / "data" / "emoji")
    prepare(["emoji-backgrounds"], tmp_path / "data")
    found = Examples(tmp_path / "ex", data=tmp_path / "data").background_examples()
    assert len(found) == 4 and all(c == "animal, vehicle, building, tool, drink" for _, c in found)
    assert all(Image.open(p).size == (192, 192) for p, _ in found)


def test_adapters_are_listed_by_name_so_the_shipped_default_comes_first(service, tmp_path):
    import shutil

    from app.main import DEFAULT_ADAPTERS

    folder = tmp_path / "order"
    folder.mkdir()
    for name in ("x-drm", "x", "w"):
        shutil.copy(tmp_path / "colours.safetensors", folder / f"{name}.safetensors")
    assert list(discover_adapters(folder)) == ["w", "x", "x-drm"]  # by name: "x" before "x-drm"
    shipped = discover_adapters(DEFAULT_ADAPTERS)
    first = next(iter(shipped.values()))
    assert first.name == "emoji-backgrounds" and first.info["training"]["benchmark"] == "emoji-backgrounds"
    assert first.drm is None and shipped["emoji-backgrounds-drm"].drm is not None


def test_the_app_prepares_missing_data_once_and_starts_without_it_on_failure(tmp_path, monkeypatch, caplog):
    import radapter.data.prepare as prep
    from app.main import APP_DATA, prepare_data

    asked: list[list[str]] = []

    def fake_prepare(names, root, **kwargs):
        asked.append(list(names))
        for n in names:
            if n != "segmentation":  # one benchmark fails to prepare
                (root / n).mkdir(parents=True, exist_ok=True)
        raise radapter.RAdapterError("npm is not installed")

    monkeypatch.setattr(prep, "prepare", fake_prepare)
    monkeypatch.setattr(prep, "is_prepared", lambda folder: folder.is_dir())
    with caplog.at_level("INFO"):
        missing = prepare_data(tmp_path)
    assert asked == [list(APP_DATA)] and missing == ["segmentation"]
    assert "could not prepare" in caplog.text and "npm is not installed" in caplog.text
    asked.clear()
    (tmp_path / "segmentation").mkdir()
    assert prepare_data(tmp_path) == [] and asked == []  # all there: nothing is prepared again
