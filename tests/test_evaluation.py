import json

import numpy as np
import pytest
import torch

import radapter
from radapter import evaluation as ev
from radapter.data.benchmark_spec import BenchmarkSpec
from radapter.data.benchmarks import Benchmark
from radapter.data.sets import ClassificationSet, RetrievalSet
from tests.conftest import randomize_adapters

COLOURS = ["red", "green", "blue"]
RGB = np.array([[220, 20, 20], [20, 200, 40], [20, 40, 220]], np.uint8)


def _set(name, n=12, noise=10, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = np.clip(RGB[labels][:, None, None, :] + rng.normal(0, noise, (n, 16, 16, 3)), 0, 255).astype(np.uint8)
    return ClassificationSet(name, images, labels, COLOURS)


@pytest.fixture
def bench():
    spec = BenchmarkSpec(name="colours", task="classification", description="", classnames=tuple(COLOURS),
                         prompt_names=tuple(COLOURS), templates=("a {} square.", "{}"))
    return Benchmark(spec=spec, val=_set("val"), test=_set("test"), ood={"noisy": _set("noisy", noise=80, seed=1),
                                                                        "noisier": _set("noisier", noise=120, seed=2)})


def test_classification_metrics_match_manual_computation(tiny, bench):
    model, preprocess, tok = tiny
    res = ev.evaluate_benchmark_classification(model, tok, preprocess, bench, progress=False)
    head = radapter.zero_shot_classifier(model, tok, COLOURS, bench.spec.templates)
    x = torch.stack([preprocess(radapter.data.open_image(im)) for im in bench.test.images])
    with torch.no_grad():
        preds = head(model.encode_image(x)).argmax(1).numpy()
    assert res["id"]["top1"] == pytest.approx(np.mean(preds == bench.test.labels))
    assert set(res["ood"]) == {"noisy", "noisier"}
    assert res["ood_avg"]["top1"] == pytest.approx((res["ood"]["noisy"]["top1"] + res["ood"]["noisier"]["top1"]) / 2)
    assert {"top1", "macro_f1", "ece"} <= res["id"].keys()


def test_validation_scores_the_id_split_alone(tiny, bench):
    """Choosing on val never looks at the OOD sets (they are test sets), and costs one set."""
    model, preprocess, tok = tiny
    radapter.add_adapters(model, radapter.RAdapterConfig())
    embedded = []
    real = ev.harness.embed_images

    def counting(model, dataset, **kw):
        embedded.append(kw.get("desc"))
        return real(model, dataset, **kw)

    ev.harness.embed_images = counting
    try:
        val = ev.evaluate_benchmark_classification(model, tok, preprocess, bench, split="val", progress=False)
        sweep = ev.alpha_sweep(model, tok, preprocess, bench, alphas=[0.0, 1.0], split="val", progress=False)
    finally:
        ev.harness.embed_images = real
    assert val["ood"] == {} and val["ood_avg"] == {} and val["id"]["n"] == len(bench.val.labels)
    assert embedded == ["id"] * 3 and all(p["ood"] == {} for p in sweep["points"])
    with pytest.raises(ValueError, match="split"):
        ev.evaluate_benchmark_classification(model, tok, preprocess, bench, split="train", progress=False)
    with pytest.raises(ValueError, match="no val split"):
        ev.evaluate_benchmark_classification(model, tok, preprocess, Benchmark(spec=bench.spec, test=bench.test),
                                             split="val", progress=False)


def test_alpha_sweep_remerges_and_plots(tiny, bench, tmp_path):
    model, preprocess, tok = tiny
    zero_shot = ev.evaluate_benchmark_classification(model, tok, preprocess, bench, progress=False)
    radapter.add_adapters(model, radapter.RAdapterConfig())
    randomize_adapters(model, std=0.2)
    sweep = ev.alpha_sweep(model, tok, preprocess, bench, alphas=[0.0, 0.5, 1.0], progress=False)
    assert [p["alpha"] for p in sweep["points"]] == [0.0, 0.5, 1.0]
    assert sweep["points"][0]["id"]["top1"] == pytest.approx(zero_shot["id"]["top1"])
    assert sweep["points"][0]["ood_avg"]["top1"] == pytest.approx(zero_shot["ood_avg"]["top1"])
    assert radapter.merged_alpha(model) == 1.0
    png = ev.plot_alpha_sweep(sweep, tmp_path / "sweep.png", current_alpha=0.5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ev.alpha_grid() == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def test_retrieval_recall(tiny):
    model, preprocess, tok = tiny
    rset = RetrievalSet("r", _set("x", n=6).images, ["red", "a red square", "green", "blue", "red", "green", "blue"],
                        np.array([0, 0, 1, 2, 3, 4, 5]))
    res = ev.evaluate_retrieval(model, tok, preprocess, rset, progress=False)
    assert {"i2t_r1", "t2i_r1", "i2t_r10", "t2i_r10"} <= res.keys()
    assert res["i2t_r10"] == 1.0 and res["t2i_r10"] == 1.0  # fewer candidates than k
    assert res["images"] == 6 and res["captions"] == 7


def test_eval_cli_on_user_folders(tmp_path, tiny, capsys):
    from PIL import Image

    from radapter.cli import main

    for split, noise in (("id", 10), ("shifted", 90)):
        s = _set(split, n=6, noise=noise)
        for i, (im, y) in enumerate(zip(s.images, s.labels, strict=True)):
            (tmp_path / split / COLOURS[y]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(tmp_path / split / COLOURS[y] / f"{i}.png")
    out = tmp_path / "r.json"
    code = main(["eval", "--model", radapter.TINY_MODEL, "--id", f"folder:{tmp_path / 'id'}",
                 "--ood", f"shifted=folder:{tmp_path / 'shifted'}", "--templates", "simple", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())["results"]["user"]["classification"]
    assert result["id"]["n"] == 6 and result["ood"]["shifted"]["n"] == 6
    assert main(["eval", "--model", radapter.TINY_MODEL]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", "--model", radapter.TINY_MODEL, "--id", "folder:/nonexistent"]) == 2
