import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radapter.data import load_benchmark
from radapter.data.benchmarks import BenchmarkNotPrepared
from radapter.data.prepare import MissingSourceError, is_prepared, prepare, prepare_fmnist

FIXTURES = Path(__file__).parent / "fixtures"


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "fmnist-src"
    src.mkdir()
    _write_idx(src / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (60, 28, 28)))
    _write_idx(src / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 60))
    _write_idx(src / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)))
    _write_idx(src / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    return src


def test_fmnist_prepare_load_and_idempotence(tmp_path, fake_fmnist):
    root = tmp_path / "data"
    status = prepare(["fmnist"], root, fmnist_dir=fake_fmnist, limit_ood=4)
    assert status == {"fmnist": "prepared"}
    b = load_benchmark("fmnist", root)
    assert len(b.train) + len(b.val) == 60 and len(b.val) == 6 and len(b.test) == 20
    assert b.test.images.shape == (20, 32, 32)
    assert b.test.images[:, 0, :].min() == 255  # padded with white paper
    assert len(b.ood) == 12 and all(len(s) == 4 and s.images.shape[1:] == (32, 32, 3) for s in b.ood.values())
    assert {"gaussian_noise-2", "fog-4", "jpeg_compression-4"} <= set(b.ood)
    assert b.test.classnames[2] == "cardigan"  # the prompt name picked on val (specs/fmnist.json)
    manifest = json.loads((root / "fmnist" / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in (root / "fmnist").glob("*.npz")}
    assert prepare(["fmnist"], root, fmnist_dir=fake_fmnist) == {"fmnist": "up to date"}
    # A damaged file is detected by its checksum and rebuilt.
    (root / "fmnist" / "test.npz").write_bytes(b"broken")
    assert not is_prepared(root / "fmnist")
    assert prepare(["fmnist"], root, fmnist_dir=fake_fmnist, limit_ood=4) == {"fmnist": "prepared"}


def test_missing_sources_say_what_to_install(tmp_path):
    with pytest.raises(MissingSourceError, match="dataset-fashion-mnist"):
        prepare_fmnist(tmp_path / "out", source=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()
    with pytest.raises(BenchmarkNotPrepared, match=r"python -m radapter\.data\.prepare fmnist"):
        load_benchmark("fmnist", tmp_path)


def test_digits_with_optional_opencv_sheet(tmp_path):
    sheet = tmp_path / "digits.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 2000)).astype(np.uint8)).save(sheet)
    prepare(["digits"], tmp_path / "data", opencv_digits=sheet)
    b = load_benchmark("digits", tmp_path / "data")
    assert (len(b.train), len(b.val), len(b.test)) == (3000, 500, 1500)
    assert set(b.ood) == {"uci-8x8", "opencv-sheet"}
    assert len(b.ood["uci-8x8"]) == 1797 and len(b.ood["opencv-sheet"]) == 1000
    assert np.bincount(b.ood["opencv-sheet"].labels).tolist() == [100] * 10
    assert all(s.images.shape[1:] == (32, 32) for s in [b.test, *b.ood.values()])
    # no ID image appears in two splits
    flat = {s: {im.tobytes() for im in getattr(b, s).images} for s in ("train", "val", "test")}
    assert not (flat["train"] & flat["test"]) and not (flat["val"] & flat["test"])


def test_emoji_and_segmentation_from_fixture(tmp_path):
    root = tmp_path / "data"
    prepare(["emoji", "segmentation"], root, emoji_dir=FIXTURES / "emoji")
    b = load_benchmark("emoji", root)
    meta = json.loads((root / "emoji" / "emoji_meta.json").read_text())
    assert len(meta) == 27  # Component excluded
    assert {"train", "test"} <= {m["split"] for m in meta}  # 3 per category: no room for val here
    test_ids = {m["unified"] for m in meta if m["split"] == "test"}
    train_ids = {m["unified"] for m in meta if m["split"] == "train"}
    assert not test_ids & train_ids  # split by emoji, not by image
    assert len(b.test) == len(b.ood["twitter"]) == len(test_ids)
    assert b.test.images.shape[1:] == (64, 64, 4)
    assert not np.array_equal(b.test.images, b.ood["twitter"].images)  # two drawing styles
    r = b.retrieval["google-all"]
    assert len(r.images) == 27 and len(r.captions) > 27  # names + short names
    assert r.captions[r.caption_image.tolist().index(0)] == meta[0]["name"]
    s = load_benchmark("segmentation", root)
    g, t = s.segmentation["google"], s.segmentation["twitter"]
    assert g.images.shape == (160, 224, 224, 3) and g.masks.shape == (160, 224, 224)
    for i in range(0, 160, 37):
        k = len(g.object_names[i])
        assert k in (2, 3) and set(np.unique(g.masks[i])) == set(range(k + 1))
        assert set(g.object_names[i]) <= {m["name"] for m in meta if m["split"] == "test"}
    assert g.object_names == t.object_names  # same layouts in both styles


def _fake_prepared_emoji(folder: Path, per_class: int = 6, splits: tuple[str, ...] = ("train",)) -> None:
    """A prepared-emoji folder with ``per_class`` disc-shaped emoji in each emoji-backgrounds class,
    named after their class, their emoji split taken in turn from ``splits``."""
    from radapter.atomic import atomic_dir
    from radapter.data.benchmark_spec import get_spec
    from radapter.data.prepare import _finish

    subs = get_spec("emoji-backgrounds").extra["subcategories"]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 32) ** 2 + (xx - 32) ** 2 < 24 ** 2).astype(np.uint8) * 255
    meta, images = [], {"google": [], "twitter": []}
    for k, (name, sub) in enumerate(subs.items()):
        for j in range(per_class):
            meta.append({"unified": f"{k}-{j}", "name": f"{name} {j}", "captions": [f"{name} {j}"],
                         "category": "x", "subcategory": sub[j % len(sub)], "split": splits[j % len(splits)],
                         "image": "x.png"})
            for style in images:
                rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
                images[style].append(np.dstack([rgb, disc]))
    with atomic_dir(folder) as tmp:
        for style, ims in images.items():
            np.savez_compressed(tmp / f"{style}.npz", images=np.stack(ims))
        (tmp / "emoji_meta.json").write_text(json.dumps(meta))
        _finish(tmp, {}, {})


def test_emoji_backgrounds_ties_splits_and_groups(tmp_path):
    root = tmp_path / "data"
    _fake_prepared_emoji(root / "emoji")
    assert prepare(["emoji-backgrounds"], root) == {"emoji-backgrounds": "prepared"}
    b = load_benchmark("emoji-backgrounds", root)
    spec = b.spec.extra
    ties, n_bg = np.array(spec["class_background"]), len(spec["backgrounds"])
    assert set(b.ood) == {"conflict", "twitter-conflict"}
    folder = root / "emoji-backgrounds"
    files = {n: np.load(folder / f"{n}.npz") for n in ("train", "val", "test", "ood_conflict",
                                                       "ood_twitter-conflict")}
    # split by emoji: no emoji in two splits
    used = {n: set(z["emoji"].tolist()) for n, z in files.items()}
    assert not (used["train"] & used["test"]) and not (used["train"] & used["val"]) and not (used["val"] & used["test"])
    assert used["ood_conflict"] == used["test"]
    # the tie: 95% of train/val/test images on their class's background (rounded per split)
    for n in ("train", "val", "test"):
        z = files[n]
        own = np.mean(z["backgrounds"] == ties[z["labels"]])
        assert abs(own - spec["agreement"]) <= 1 / len(z["labels"]) + 1e-9, (n, own)
    # OOD: the tie broken, every test emoji once on every other background, in both styles
    for n in ("ood_conflict", "ood_twitter-conflict"):
        z = files[n]
        assert not np.any(z["backgrounds"] == ties[z["labels"]])
        assert len(z["labels"]) == len(used["test"]) * (n_bg - 1)
    assert not np.array_equal(files["ood_conflict"]["images"], files["ood_twitter-conflict"]["images"])
    # exact masks: the pasted disc, 48-72 px across, inside the 96 px image
    masks = files["train"]["masks"]
    assert masks.shape == (len(files["train"]["labels"]), 96, 96) and masks.any(axis=(1, 2)).all()
    # groups = class x background, as loaded
    z = files["ood_conflict"]
    assert np.array_equal(b.ood["conflict"].groups, z["labels"] * n_bg + z["backgrounds"])
    assert b.test.min_group_size == spec["min_group_images"]
    # deterministic: a forced rebuild writes the same bytes
    before = json.loads((folder / "manifest.json").read_text())["files"]
    prepare(["emoji-backgrounds"], root, force=True)
    assert json.loads((folder / "manifest.json").read_text())["files"] == before


def test_emoji_backgrounds_needs_the_emoji_first(tmp_path):
    with pytest.raises(MissingSourceError, match="prepare 'emoji' first"):
        prepare(["emoji-backgrounds"], tmp_path / "data")
