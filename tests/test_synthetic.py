"""Tests for the synthetic compositional image-caption dataset."""

from __future__ import annotations

import re

import pytest

from mmalign.data.synthetic import (
    COLOURS,
    SHAPES,
    _RGB,  # palette, to check that pixels match the structured truth
    generate_synthetic,
    heldout_pairs,
)

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
ROW = {"top": 0, "middle": 1, "bottom": 2}
COL = {"left": 0, "center": 1, "right": 2}
REL = {
    "left of": "left", "to the left of": "left", "right of": "right", "to the right of": "right",
    "above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below",
}
_C, _S = "|".join(COLOURS), "|".join(SHAPES)
_REF = rf"the (?:(small|large) )?({_C}) ({_S})"
_RELATION_RE = re.compile(rf"{_REF} is ({'|'.join(sorted(REL, key=len, reverse=True))}) {_REF}")


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return generate_synthetic(seed=3, n_train=300, n_val=60, n_test=120)


def test_same_seed_gives_identical_pixels_and_captions(data):
    again = generate_synthetic(seed=3, n_train=300, n_val=60, n_test=120)
    for split in ("train", "val", "test"):
        assert len(again[split]) == len(data[split])
        for a, b in zip(data[split], again[split]):
            assert a["id"] == b["id"]
            assert a["image"].tobytes() == b["image"].tobytes()
            assert a["captions"] == b["captions"]
            assert a["objects"] == b["objects"]


def test_different_seed_differs(data):
    other = generate_synthetic(seed=4, n_train=300, n_val=0, n_test=0)["train"]
    pairs = list(zip(data["train"], other))
    same_pixels = sum(a["image"].tobytes() == b["image"].tobytes() for a, b in pairs)
    same_captions = sum(a["captions"] == b["captions"] for a, b in pairs)
    assert same_pixels == 0
    assert same_captions < 10  # a one-object scene can recur by chance, not most of them


def test_split_contents_do_not_depend_on_other_split_sizes(data):
    small = generate_synthetic(seed=3, n_train=50, n_val=5, n_test=7)
    for split, n in (("train", 50), ("val", 5), ("test", 7)):
        for a, b in zip(small[split], data[split][:n]):
            assert a["image"].tobytes() == b["image"].tobytes()
            assert a["captions"] == b["captions"]


def test_splits_differ_from_each_other(data):
    train_bytes = {s["image"].tobytes() for s in data["train"]}
    assert sum(s["image"].tobytes() in train_bytes for s in data["val"]) < len(data["val"]) // 10


def test_heldout_pairs_are_a_deterministic_small_cover():
    pairs = heldout_pairs(7)
    assert pairs == heldout_pairs(7)
    assert 0.15 <= len(pairs) / (len(COLOURS) * len(SHAPES)) <= 0.20
    colours, shapes = [c for c, _ in pairs], [s for _, s in pairs]
    assert sorted(shapes) == sorted(SHAPES)  # each shape held out exactly once
    assert len(set(colours)) == len(colours)  # each colour at most once
    assert all(c in COLOURS for c in colours)
    assert any(heldout_pairs(seed) != pairs for seed in range(10))


def test_heldout_pairs_never_in_train_or_val_and_in_every_test_image(data):
    held = set(heldout_pairs(3))
    for split in ("train", "val"):
        seen = {(o["colour"], o["shape"]) for s in data[split] for o in s["objects"]}
        assert not seen & held, split
    trained = {(o["colour"], o["shape"]) for s in data["train"] for o in s["objects"]}
    # Every colour and every shape is still learned, only the held-out combinations are new.
    assert {c for c, _ in trained} == set(COLOURS)
    assert {s for _, s in trained} == set(SHAPES)
    for sample in data["test"]:
        assert any((o["colour"], o["shape"]) in held for o in sample["objects"]), sample["id"]


def test_images_have_requested_mode_and_size():
    out = generate_synthetic(seed=0, n_train=3, n_val=2, n_test=2, image_size=48)
    for split, samples in out.items():
        for i, sample in enumerate(samples):
            assert sample["id"] == f"{split}-{i:05d}"
            assert sample["image"].mode == "RGB"
            assert sample["image"].size == (48, 48)


def test_object_counts_cells_and_boxes(data):
    counts = set()
    for sample in data["train"] + data["val"] + data["test"]:
        objects = sample["objects"]
        counts.add(len(objects))
        cells = [(o["row"], o["col"]) for o in objects]
        assert len(set(cells)) == len(cells)  # distinct cells: objects never overlap
        for o in objects:
            assert o["size"] in ("small", "large")
            assert o["position"] == f"{o['row']} {o['col']}"
            x0, y0, x1, y1 = o["box"]
            cell = 64 / 3
            assert COL[o["col"]] * cell - 0.01 <= x0 < x1 <= (COL[o["col"]] + 1) * cell + 0.01
            assert ROW[o["row"]] * cell - 0.01 <= y0 < y1 <= (ROW[o["row"]] + 1) * cell + 0.01
    assert counts == {1, 2, 3, 4}


def test_max_objects_bounds_counts():
    out = generate_synthetic(seed=1, n_train=100, n_val=0, n_test=20, max_objects=2)
    assert {len(s["objects"]) for s in out["train"] + out["test"]} == {1, 2}
    single = generate_synthetic(seed=1, n_train=20, n_val=0, n_test=0, max_objects=1)
    assert all(len(s["objects"]) == 1 for s in single["train"])


def test_large_objects_are_larger_than_small_ones(data):
    widths = {"small": [], "large": []}
    for sample in data["train"]:
        for o in sample["objects"]:
            widths[o["size"]].append(o["box"][2] - o["box"][0])
    assert max(widths["small"]) < min(widths["large"])


def test_pixels_match_the_object_colours(data):
    for sample in data["train"][:100] + data["test"][:50]:
        for o in sample["objects"]:
            x0, y0, x1, y1 = o["box"]
            pixel = sample["image"].getpixel((int((x0 + x1) / 2), int((y0 + y1) / 2)))
            nearest = min(_RGB, key=lambda c: sum((p - q) ** 2 for p, q in zip(pixel, _RGB[c])))
            assert nearest == o["colour"], (sample["id"], o, pixel)


@pytest.mark.parametrize("k", [3, 5, 12])
def test_captions_are_distinct_clean_paraphrases(k):
    out = generate_synthetic(seed=2, n_train=80, n_val=0, n_test=20, captions_per_image=k)
    for sample in out["train"] + out["test"]:
        captions = sample["captions"]
        assert len(captions) == k
        assert len(set(captions)) == k
        for c in captions:
            assert c == c.strip() and c == c.lower() and c.isascii()
            assert "  " not in c


def test_captions_describe_every_object_and_true_relations(data):
    relations_checked = 0
    for sample in data["train"] + data["test"]:
        objects = sample["objects"]
        for caption in sample["captions"]:
            for o in objects:
                assert any(
                    f"{w} {o['colour']} {o['shape']}" in caption for w in SIZE_WORDS[o["size"]]
                ), (caption, o)
            found = _RELATION_RE.findall(caption)
            if len(objects) >= 2:
                assert found, caption
            for size_a, colour_a, shape_a, rel, size_b, colour_b, shape_b in found:
                a = _resolve(objects, size_a, colour_a, shape_a)
                b = _resolve(objects, size_b, colour_b, shape_b)
                assert _holds(a, b, REL[rel]), (caption, objects)
                relations_checked += 1
    assert relations_checked > 100


def test_relations_use_all_four_directions(data):
    captions = [c for s in data["train"] for c in s["captions"]]
    used = {REL[m[3]] for c in captions for m in _RELATION_RE.findall(c)}
    assert used == {"left", "right", "above", "below"}


def test_caption_templates_vary(data):
    captions = [c for s in data["train"] for c in s["captions"]]
    assert len({" ".join(c.split(" ")[:2]) for c in captions}) >= 8  # distinct openings
    assert any(c.startswith("there is") for c in captions)
    assert any(c.startswith("an image with") for c in captions)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_train": -1}, "n_train"),
        ({"n_val": -5}, "n_val"),
        ({"n_test": -1}, "n_test"),
        ({"image_size": 16}, "image_size"),
        ({"captions_per_image": 2}, "captions_per_image"),
        ({"max_objects": 0}, "max_objects"),
        ({"max_objects": 10}, "max_objects"),
        ({"n_train": 2.5}, "n_train"),
    ],
)
def test_bad_arguments_raise_naming_the_parameter(kwargs, name):
    args = {"seed": 0, "n_train": 1, "n_val": 1, "n_test": 1} | kwargs
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        generate_synthetic(**args)


def test_zero_sized_splits_are_allowed():
    out = generate_synthetic(seed=0, n_train=0, n_val=0, n_test=0)
    assert out == {"train": [], "val": [], "test": []}


def _resolve(objects: list[dict], size: str, colour: str, shape: str) -> dict:
    matches = [
        o
        for o in objects
        if (o["colour"], o["shape"]) == (colour, shape) and size in ("", o["size"])
    ]
    assert len(matches) == 1, (size, colour, shape, objects)  # references must be unambiguous
    return matches[0]


def _holds(a: dict, b: dict, relation: str) -> bool:
    return {
        "left": COL[a["col"]] < COL[b["col"]],
        "right": COL[a["col"]] > COL[b["col"]],
        "above": ROW[a["row"]] < ROW[b["row"]],
        "below": ROW[a["row"]] > ROW[b["row"]],
    }[relation]
