"""Synthetic compositional image-caption dataset (the offline default data).

Each image is a light, faintly tinted canvas split into a 3x3 grid. One to
``max_objects`` objects are placed in distinct cells (so they never overlap), each with a
colour, a shape, a size (small/large) and a small jitter of position and size. Shapes are
drawn at 4x resolution and box-downsampled (each pixel = mean of its 4x4 block, i.e. exact
coverage antialiasing), so edges are smooth and shapes stay recognisable at 64x64.

Captions describe every object (size, colour, shape, position) and, with two or more
objects, at least one true spatial relation ("the red circle is left of the blue
square"). ``captions[0]`` is a canonical caption (reading order, first synonym of every
word); the others are distinct paraphrases drawn from several templates, synonyms
(big/large, small/little/tiny, "there is", "an image with", a position-first word order,
...) and a shuffled object order, so a model must read the image, not memorise one string.

Compositional generalisation: ``heldout_pairs(seed)`` picks one (colour, shape) pair per
shape, each with a different colour. Train and val never contain them; every test image
contains at least one (its other objects are drawn from all pairs). Every colour and every
shape still occurs in training, only the combination is new. Val follows the training
distribution.

Determinism: every image has its own ``random.Random`` seeded from (seed, split, index),
so a sample depends only on those (and on ``max_objects``): the same seed gives identical
pixels and captions, split sizes do not change each other's contents, and a larger split
starts with the samples of a smaller one. The scene is drawn before the captions, so
``captions_per_image`` and ``image_size`` do not change the layout.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from numbers import Integral

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Saturated and far apart in RGB (yellow and orange differ by ~70 in G, red and orange by ~100),
# all dark enough in at least one channel to stand out on a light background.
_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "green": (30, 155, 45),
    "blue": (30, 75, 225),
    "yellow": (235, 200, 10),
    "purple": (135, 45, 175),
    "orange": (245, 125, 15),
}
_COLOUR_JITTER = 12  # per channel; keeps colours distinct while not a single exact pixel value
_SUPERSAMPLE = 4
_GRID = 3
# Object extent as a fraction of a grid cell; the gap between the classes keeps "small"
# and "large" unambiguous even with the +-5% size jitter.
_SIZE_FRACTION = {"small": 0.42, "large": 0.74}
# Triangles and diamonds cover half their box, circles ~0.79: scale them up a little so
# the same size word means about the same visual weight.
_SHAPE_SCALE = {"circle": 1.0, "square": 0.92, "triangle": 1.12, "diamond": 1.15}
# Favour 1-2 objects so captions stay learnable, but keep 3+ objects common.
_COUNT_WEIGHTS = (3.0, 3.5, 2.0, 1.5, 1.0, 1.0, 1.0, 1.0, 1.0)
MAX_OBJECTS_LIMIT = len(_COUNT_WEIGHTS)  # = cells in the 3x3 grid
MIN_IMAGE_SIZE = 32
MIN_CAPTIONS, MAX_CAPTIONS = 3, 20

# Caption vocabulary. Every size word starts with a consonant, so the article is always "a".
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_POS_WORDS = {
    ("top", "left"): ("in the top left", "in the upper left corner"),
    ("top", "center"): ("at the top", "in the top middle"),
    ("top", "right"): ("in the top right", "in the upper right corner"),
    ("middle", "left"): ("on the left", "on the left side"),
    ("middle", "center"): ("in the center", "in the middle"),
    ("middle", "right"): ("on the right", "on the right side"),
    ("bottom", "left"): ("in the bottom left", "in the lower left corner"),
    ("bottom", "center"): ("at the bottom", "in the bottom middle"),
    ("bottom", "right"): ("in the bottom right", "in the lower right corner"),
}
_REL_WORDS = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_COUNT_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {objs}: the object list; {count}/{noun}: "two shapes". Position-first clauses are a
# separate form (see _random_caption).
_TEMPLATES = (
    "{objs}",
    "there is {objs}",
    "there {be} {count} {noun}: {objs}",
    "an image with {objs}",
    "a picture showing {objs}",
    "a drawing of {objs}",
    "{objs} on a plain background",
    "{count} {noun} on a light background: {objs}",
)
_RELATION_CONNECTORS = (", ", "; ", ", and ", ", where ")


@dataclass(frozen=True)
class _Object:
    colour: str
    shape: str
    size: str
    row: int  # 0..2, index into ROWS
    col: int  # 0..2, index into COLS
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in output pixels
    rgb: tuple[int, int, int]

    def as_dict(self) -> dict:
        x0, y0, x1, y1 = self.box
        return {
            "colour": self.colour,
            "shape": self.shape,
            "size": self.size,
            "row": ROWS[self.row],
            "col": COLS[self.col],
            "position": f"{ROWS[self.row]} {COLS[self.col]}",
            "box": [round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2)],
        }


def heldout_pairs(seed: int) -> list[tuple[str, str]]:
    """(colour, shape) pairs that never occur in train/val; every test image has one.

    One pair per shape, each with a different colour: 4 of 24 combinations (~17%), so each
    shape and each colour is held out at most once and all of them still appear in training.
    Sorted, and a function of ``seed`` only.
    """
    rng = random.Random(f"mmalign-synthetic:{seed}:heldout")
    colours = rng.sample(COLOURS, len(SHAPES))
    return sorted(zip(colours, SHAPES))


def generate_synthetic(
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
    image_size: int = 64,
    captions_per_image: int = 4,
    max_objects: int = 4,
) -> dict[str, list[dict]]:
    """Generate the train/val/test splits.

    Returns ``{"train": [...], "val": [...], "test": [...]}``; each sample is
    ``{"id": "train-00012", "image": PIL.Image (RGB, image_size x image_size),
    "captions": list[str] (captions_per_image distinct, captions[0] canonical),
    "objects": [{"colour", "shape", "size", "row", "col", "position", "box"}, ...]}``
    with ``box = [x0, y0, x1, y1]`` in pixels of the returned image.
    """
    _check_args(n_train, n_val, n_test, image_size, captions_per_image, max_objects)
    held = heldout_pairs(seed)
    held_set = set(held)
    train_pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held_set]
    all_pairs = [(c, s) for c in COLOURS for s in SHAPES]
    counts = {"train": n_train, "val": n_val, "test": n_test}
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        samples = []
        for i in range(counts[split]):
            rng = random.Random(f"mmalign-synthetic:{seed}:{split}:{i}")
            if split == "test":
                objects = _sample_scene(rng, max_objects, all_pairs, image_size, forced=held)
            else:
                objects = _sample_scene(rng, max_objects, train_pairs, image_size, forced=None)
            image = _render(rng, objects, image_size)
            samples.append(
                {
                    "id": f"{split}-{i:05d}",
                    "image": image,
                    "captions": _captions(rng, objects, captions_per_image),
                    "objects": [o.as_dict() for o in objects],
                }
            )
        out[split] = samples
    logger.info(
        "synthetic data: %d train, %d val, %d test images; held-out pairs %s",
        n_train, n_val, n_test, held,
    )
    return out


def _check_args(
    n_train: int,
    n_val: int,
    n_test: int,
    image_size: int,
    captions_per_image: int,
    max_objects: int,
) -> None:
    def check(name: str, value: object, lo: int, hi: int | None) -> None:
        allowed = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        if not isinstance(value, Integral) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"{name} must be {allowed}, got {value}")

    check("n_train", n_train, 0, None)
    check("n_val", n_val, 0, None)
    check("n_test", n_test, 0, None)
    check("image_size", image_size, MIN_IMAGE_SIZE, None)
    check("captions_per_image", captions_per_image, MIN_CAPTIONS, MAX_CAPTIONS)
    check("max_objects", max_objects, 1, MAX_OBJECTS_LIMIT)


def _sample_scene(
    rng: random.Random,
    max_objects: int,
    pairs: list[tuple[str, str]],
    image_size: int,
    forced: list[tuple[str, str]] | None,
) -> list[_Object]:
    """Objects in distinct cells with unique (colour, shape, size); one from ``forced`` if given.

    The number of random draws does not depend on ``image_size`` (sizes and jitters are drawn
    as fractions), so the same seed gives the same scene at every resolution.
    """
    n = rng.choices(range(1, max_objects + 1), weights=_COUNT_WEIGHTS[:max_objects])[0]
    cells = rng.sample(range(_GRID * _GRID), n)
    forced_index = rng.randrange(n) if forced else -1
    seen: set[tuple[str, str, str]] = set()
    cell = image_size / _GRID
    objects = []
    for k, cell_id in enumerate(cells):
        while True:  # unique (colour, shape, size) keeps every caption reference unambiguous
            colour, shape = rng.choice(forced) if k == forced_index else rng.choice(pairs)
            size = rng.choice(SIZES)
            if (colour, shape, size) not in seen:
                break
        seen.add((colour, shape, size))
        row, col = divmod(cell_id, _GRID)
        width = cell * _SIZE_FRACTION[size] * _SHAPE_SCALE[shape] * rng.uniform(0.95, 1.05)
        # An equilateral triangle is sqrt(3)/2 as tall as it is wide.
        height = width * 0.866 if shape == "triangle" else width
        slack_x, slack_y = (cell - width) / 2, (cell - height) / 2
        cx = (col + 0.5) * cell + rng.uniform(-0.8, 0.8) * slack_x
        cy = (row + 0.5) * cell + rng.uniform(-0.8, 0.8) * slack_y
        rgb = tuple(
            min(255, max(0, v + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for v in _RGB[colour]
        )
        box = (cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2)
        objects.append(_Object(colour, shape, size, row, col, box, rgb))  # type: ignore[arg-type]
    return objects


def _render(rng: random.Random, objects: list[_Object], image_size: int) -> Image.Image:
    """Draw at ``_SUPERSAMPLE`` x resolution, then average each block.

    ``Image.reduce`` is a box filter: area-coverage antialiasing without the ringing halos
    of LANCZOS, and ~18x faster (LANCZOS took most of the generation time).
    """
    grey = rng.randint(228, 248)
    background = tuple(min(255, grey + rng.randint(-6, 6)) for _ in range(3))  # faint tint
    big = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x0, y0, x1, y1 = (v * _SUPERSAMPLE for v in obj.box)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=obj.rgb)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=obj.rgb)
        elif obj.shape == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=obj.rgb)
        elif obj.shape == "diamond":
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=obj.rgb)
        else:  # pragma: no cover - SHAPES and this function must change together
            raise ValueError(f"unknown shape {obj.shape!r}; allowed: {SHAPES}")
    return image.reduce(_SUPERSAMPLE)


def _captions(rng: random.Random, objects: list[_Object], k: int) -> list[str]:
    """``k`` distinct captions: the canonical one, then random paraphrases."""
    captions = [_canonical_caption(objects)]
    for _ in range(200 * k):
        if len(captions) == k:
            return captions
        caption = _random_caption(rng, objects)
        if caption not in captions:
            captions.append(caption)
    # Unreachable with the vocabulary above (a one-object scene has > 100 paraphrases).
    raise RuntimeError(f"could only build {len(captions)} distinct captions of {k} requested")


def _canonical_caption(objects: list[_Object]) -> str:
    ordered = sorted(objects, key=lambda o: (o.row, o.col))
    text = _join([_phrase(o, _SIZE_WORDS[o.size][0], _POS_WORDS[_cell(o)][0]) for o in ordered])
    if len(ordered) >= 2:
        a, b = ordered[0], ordered[1]
        relation = "left" if a.row == b.row else "above"  # reading order: a is first
        text += ", " + _relation(objects, a, b, relation, 0)
    return text


def _random_caption(rng: random.Random, objects: list[_Object]) -> str:
    ordered = sorted(objects, key=lambda o: (o.row, o.col))
    if rng.random() < 0.5:
        rng.shuffle(ordered)
    n = len(ordered)
    size_words = [rng.choice(_SIZE_WORDS[o.size]) for o in ordered]
    pos_words = [rng.choice(_POS_WORDS[_cell(o)]) for o in ordered]
    template_id = rng.randrange(len(_TEMPLATES) + 1)
    if template_id == len(_TEMPLATES):  # position-first word order
        text = _join(
            [
                f"{p} there is a {s} {o.colour} {o.shape}"
                for o, s, p in zip(ordered, size_words, pos_words)
            ]
        )
    else:
        objs = _join([_phrase(o, s, p) for o, s, p in zip(ordered, size_words, pos_words)])
        text = _TEMPLATES[template_id].format(
            objs=objs,
            count=_COUNT_WORDS[n - 1],
            noun="shape" if n == 1 else "shapes",
            be="is" if n == 1 else "are",
        )
    if n >= 2:
        n_relations = 1 if n == 2 else rng.randint(1, 2)
        pairs = [(a, b) for i, a in enumerate(ordered) for b in ordered[i + 1 :]]
        clauses = []
        for a, b in rng.sample(pairs, n_relations):
            options = []
            if a.col != b.col:
                options.append("left" if a.col < b.col else "right")
            if a.row != b.row:
                options.append("above" if a.row < b.row else "below")
            relation = rng.choice(options)  # objects sit in distinct cells: never empty
            if rng.random() < 0.5:
                a, b, relation = b, a, _INVERSE[relation]
            word = rng.randrange(len(_REL_WORDS[relation]))
            clauses.append(_relation(objects, a, b, relation, word))
        text += rng.choice(_RELATION_CONNECTORS) + " and ".join(clauses)
    return text


def _cell(o: _Object) -> tuple[str, str]:
    return ROWS[o.row], COLS[o.col]


def _phrase(o: _Object, size_word: str, pos_word: str) -> str:
    return f"a {size_word} {o.colour} {o.shape} {pos_word}"


def _relation(objects: list[_Object], a: _Object, b: _Object, relation: str, word: int) -> str:
    return f"{_reference(objects, a)} is {_REL_WORDS[relation][word]} {_reference(objects, b)}"


def _reference(objects: list[_Object], o: _Object) -> str:
    """"the red circle", or "the small red circle" when the scene has two red circles."""
    twins = sum(1 for p in objects if (p.colour, p.shape) == (o.colour, o.shape))
    return f"the {o.size} {o.colour} {o.shape}" if twins > 1 else f"the {o.colour} {o.shape}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
