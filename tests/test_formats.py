import json

import numpy as np
import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image

from radapter.data import formats
from radapter.data.formats import DatasetFormatError, imagenet_wnids
from radapter.data.sets import ImageLoadError, open_image


def _img(path, color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def test_image_folder_with_classnames_file(tmp_path):
    for cls, n in (("n_cat", 2), ("n_dog", 3)):
        for i in range(n):
            _img(tmp_path / "data" / cls / f"{i}.jpg")
    (tmp_path / "names.txt").write_text("n_dog\tdog\nn_cat\tcat\n")
    s = formats.image_folder(tmp_path / "data", tmp_path / "names.txt")
    assert s.classnames == ["cat", "dog"] and s.labels.tolist() == [0, 0, 1, 1, 1]
    (tmp_path / "plain.txt").write_text("a cat\na dog\n")
    assert formats.image_folder(tmp_path / "data", tmp_path / "plain.txt").classnames == ["a cat", "a dog"]
    (tmp_path / "bad.txt").write_text("one\n")
    with pytest.raises(DatasetFormatError, match="1 names for 2"):
        formats.image_folder(tmp_path / "data", tmp_path / "bad.txt")
    with pytest.raises(DatasetFormatError, match="not found"):
        formats.image_folder(tmp_path / "nope")


def test_corrupt_and_missing_images_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="not a readable image"):
        open_image(bad)
    with pytest.raises(ImageLoadError, match="not found"):
        open_image(tmp_path / "missing.png")
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(rgba)
    assert np.asarray(open_image(rgba)).min() == 255  # transparent -> white
    assert open_image(np.zeros((4, 4), np.uint8)).mode == "RGB"


def test_caption_tables_csv_and_jsonl_group_captions(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    (tmp_path / "t.csv").write_text("image,caption\na.png,a red thing\nb.png,blue\na.png,red square\n")
    r = formats.image_text_table(tmp_path / "t.csv")
    assert len(r.images) == 2 and r.caption_image.tolist() == [0, 1, 0]
    lines = [{"filepath": "a.png", "text": "x", "group": 7}, {"filepath": "b.png", "text": "y", "group": 7}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    r = formats.image_text_table(tmp_path / "t.jsonl")
    assert len(r.images) == 1 and r.caption_image.tolist() == [0, 0]
    (tmp_path / "bad.csv").write_text("path,label\na.png,3\n")
    with pytest.raises(DatasetFormatError, match="caption"):
        formats.image_text_table(tmp_path / "bad.csv")


def test_coco_captions(tmp_path):
    data = {"images": [{"id": 5, "file_name": "x.jpg"}, {"id": 2, "file_name": "y.jpg"}],
            "annotations": [{"image_id": 5, "caption": "a"}, {"image_id": 2, "caption": "b"},
                            {"image_id": 5, "caption": "c "}]}
    (tmp_path / "c.json").write_text(json.dumps(data))
    r = formats.coco_captions(tmp_path / "c.json", tmp_path / "imgs")
    assert r.images[0].endswith("y.jpg") and r.captions == ["a", "b", "c"] and r.caption_image.tolist() == [1, 0, 1]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DatasetFormatError, match="not a COCO"):
        formats.coco_captions(tmp_path / "bad.json", tmp_path)


def test_imagenet_family_layouts(tmp_path):
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and wnids[0] == "n01440764"
    _img(tmp_path / "val" / wnids[3] / "a.JPEG")
    _img(tmp_path / "val" / wnids[999] / "b.JPEG")
    s = formats.imagenet_family("imagenet", tmp_path / "val")
    assert s.labels.tolist() == [3, 999] and s.class_index is None and len(s.classnames) == 1000
    _img(tmp_path / "v2" / "7" / "a.jpeg")
    assert formats.imagenet_family("imagenet-v2", tmp_path / "v2").labels.tolist() == [7]
    r_wnids = formats._timm_info("imagenet_r_synsets.txt")
    _img(tmp_path / "r" / r_wnids[1] / "a.jpg")
    r = formats.imagenet_family("imagenet-r", tmp_path / "r")
    assert len(r.classnames) == 200 and r.labels.tolist() == [1]
    assert r.class_index[1] == [wnids.index(r_wnids[1])]
    logits = torch.zeros(1, 1000)
    logits[0, wnids.index(r_wnids[1])] = 5.0
    assert r.restrict_logits(logits).argmax(1).item() == 1
    with pytest.raises(DatasetFormatError, match="unknown"):
        formats.imagenet_family("imagenet-z", tmp_path)


def test_objectnet_groups_map_to_imagenet_classes(tmp_path):
    root = tmp_path / "objectnet-1.0"
    (root / "mappings").mkdir(parents=True)
    (root / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps({
        "Bottle cap": "bottlecap", "Banana": "banana",
        "Water bottle": "water bottle; pop bottle, soda bottle"}))
    (root / "mappings" / "folder_to_objectnet_label.json").write_text(json.dumps({
        "banana": "Banana", "water_bottle": "Water bottle", "chair": "Chair"}))
    _img(root / "images" / "banana" / "1.png")
    _img(root / "images" / "water_bottle" / "2.png")
    _img(root / "images" / "chair" / "3.png")
    s = formats.imagenet_family("objectnet", root)
    assert s.classnames == ["Banana", "Bottle cap", "Water bottle"] and s.labels.tolist() == [0, 2]
    names = [IMAGENET_CLASSNAMES[i] for i in s.class_index[2]]
    assert len(names) == 2 and "water bottle" in names
    logits = torch.zeros(1, 1000)
    logits[0, s.class_index[2][1]] = 3.0
    assert s.restrict_logits(logits).argmax(1).item() == 2
