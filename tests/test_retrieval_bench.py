"""The retrieval benchmark on the tiny model and the emoji fixture: recall, alphas and typed queries."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import radapter
from benchmarks import retrieval_bench
from radapter.data import load_benchmark
from radapter.data.prepare import prepare
from radapter.evaluation.metrics import recall_at_k
from tests.conftest import randomize_adapters

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Prepared fixture emoji, the tiny model and a randomised adapter file (default alpha 0.5)."""
    root = tmp_path_factory.mktemp("retrieval-bench")
    prepare(["emoji"], root / "data", emoji_dir=FIXTURES / "emoji")
    torch.manual_seed(0)
    loaded = radapter.load_model(radapter.TINY_MODEL)
    trained = radapter.load_model(radapter.TINY_MODEL)[0]
    trained.load_state_dict(loaded[0].state_dict())
    radapter.add_adapters(trained, radapter.RAdapterConfig())
    randomize_adapters(trained, std=0.3)
    radapter.save_adapters(trained, root / "a.safetensors", default_alpha=0.5)
    return root, loaded


@pytest.fixture(scope="module")
def result(setup):
    root, loaded = setup
    queries = {"a tree": ("tree",), "no such thing": ("zzzz",)}
    return retrieval_bench.run_benchmark(loaded, root / "a.safetensors", alphas=[0, 1], queries=queries, k=3,
                                         cache_dir=root / "cache", data_dir=root / "data", progress=False)


def _brute(model, preprocess, tokenizer, rset, template: str) -> dict[str, float]:
    """Recall from scratch: embed the set directly and score the full cosine matrix."""
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(radapter.data.sets.open_image(im)) for im in rset.images]),
                                 normalize=True)
        txt = model.encode_text(tokenizer([template.format(c) for c in rset.captions]), normalize=True)
    return recall_at_k((img @ txt.T).numpy(), np.asarray(rset.caption_image), (1, 5, 10))


def test_recall_matches_an_independent_computation(setup, result):
    root, (model, preprocess, tokenizer) = setup
    bench = load_benchmark("emoji", root / "data")
    template = bench.spec.extra["caption_template"]
    # The model now carries the adapters: at alpha 0 it is the zero-shot model, at 1 fully adapted.
    for alpha, numbers in ((0.0, result["zero_shot"]), (1.0, result["adapter_by_alpha"]["1"])):
        radapter.merge_adapters(model, alpha)
        for name, style in (("google", "google-test"), ("twitter", "twitter-test")):
            ref = _brute(model, preprocess, tokenizer, bench.retrieval[style], template)
            for d in ("t2i", "i2t"):
                for k in (1, 5, 10):
                    assert numbers[name][d][f"r{k}"] == pytest.approx(ref[f"{d}_r{k}"], abs=1e-4), (alpha, name, d, k)
            assert numbers[name]["exact_matches_index"]


def test_alphas_default_and_deltas(result):
    assert result["adapter"]["default_alpha"] == 0.5
    assert list(result["adapter_by_alpha"]) == ["0", "0.5", "1"]  # the default alpha is added to the grid
    assert result["alpha0_equals_zero_shot"] is True
    zs, ad = result["zero_shot"], result["adapter_by_alpha"]["0.5"]
    delta = result["adapter_default_minus_zero_shot"]
    assert delta["twitter"]["i2t"]["r5"] == pytest.approx(ad["twitter"]["i2t"]["r5"] - zs["twitter"]["i2t"]["r5"])
    # randomised adapters at alpha 1 do move the model, so the numbers are not all equal
    assert result["adapter_by_alpha"]["1"] != zs
    for numbers in (zs, *result["adapter_by_alpha"].values()):
        for s in ("google", "twitter"):
            for d in ("t2i", "i2t"):
                r = numbers[s][d]
                assert 0 <= r["r1"] <= r["r5"] <= r["r10"] <= 1


def test_typed_queries_are_ranked_and_marked_on_topic(result):
    ex = result["examples"]
    assert ex["set"] == "emoji:google-test" and ex["k"] == 3 and ex["alpha"] == 0.5
    tree = ex["queries"]["a tree"]
    assert tree["on_topic_in_collection"] >= 1 and all("tree" in n for n in tree["on_topic_names"])
    for side in ("zero_shot", "adapter"):
        top = tree[side]["top"]
        assert len(top) == 3 and [h["score"] for h in top] == sorted((h["score"] for h in top), reverse=True)
        assert tree[side]["on_topic_in_top_k"] == sum(h["on_topic"] for h in top)
        assert tree[side]["first_on_topic_rank"] >= 1  # every image is ranked, so it is found somewhere
    nothing = ex["queries"]["no such thing"]
    assert nothing["on_topic_in_collection"] == 0 and nothing["adapter"]["first_on_topic_rank"] is None


def test_keywords_are_whole_words():
    pat = retrieval_bench._keyword_pattern(["car", "cat"])
    assert pat.search("racing car") and pat.search("two cats") and pat.search("cat face")
    assert not pat.search("playing card") and not pat.search("carrot") and not pat.search("category")


def test_tables_and_main_write_the_result(setup, result, tmp_path, monkeypatch, capsys):
    text = retrieval_bench.tables(result)
    assert "| adapter, alpha 0.5 (default) |" in text and "| a tree |" in text
    root, _ = setup
    out = tmp_path / "r.json"
    # main on the tiny model and a one-point grid: the command and machine go into the JSON
    monkeypatch.setattr(sys, "argv", ["retrieval_bench", "--model", radapter.TINY_MODEL, "--adapter",
                                      str(root / "a.safetensors"), "--alphas", "0.5", "--data-dir",
                                      str(root / "data"), "--cache", str(tmp_path / "cache"), "--query",
                                      "a cat=cat", "--no-progress", "--out", str(out)])
    torch.manual_seed(0)  # main's tiny model is then the one the adapter file was made on (base fingerprint)
    retrieval_bench.main()
    capsys.readouterr()
    res = json.loads(out.read_text())
    assert res["command"].startswith("python -m benchmarks.retrieval_bench --model radapter-tiny-vit")
    assert {"date", "machine", "zero_shot", "adapter_by_alpha", "examples"} <= res.keys()
    assert list(res["adapter_by_alpha"]) == ["0.5"] and list(res["examples"]["queries"]) == ["a cat"]

