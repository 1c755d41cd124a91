"""Bad samples: check every row of a user split, then stop at the first bad one or drop and count them.

`on_bad_sample="error"` raises one line naming the sample id (file name, id column value, or
`<source split>/<row>`), its file if it has one, and the problem;
`"skip"` drops the row and counts it by reason (see `images.BadSample`). Never silent.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from .images import BadSample, clean_image_bytes, read_image_file

log = logging.getLogger(__name__)


def check_captions(value: str | list[str | None] | None) -> list[str]:
    """One caption or a list of them -> stripped captions; none, or a blank one, is a bad sample."""
    captions = [value] if isinstance(value, str) else list(value or [])
    if not captions or any(c is None for c in captions):
        raise BadSample("missing_caption", "the row has no caption" if not captions else "a caption is null")
    captions = [c.strip() for c in captions]
    if not all(captions):
        raise BadSample("empty_caption", f"caption {captions.index('')} of {len(captions)} is blank")
    return captions


def _where(split: str, ident: str, image: Any) -> str:
    path = image.get("path") if isinstance(image, dict) else image
    return f"'{ident}' (split '{split}'" + (f", file '{path}')" if path else ")")


def _check_batch(batch: dict[str, list], split: str, on_bad: str) -> dict[str, list]:
    out: dict[str, list] = {"image": [], "captions": [], "bad": []}
    for ident, image, captions in zip(batch["id"], batch["image"], batch["captions"]):
        try:
            captions = check_captions(captions)
            image, bad = {"bytes": clean_image_bytes(read_image_file(image)), "path": None}, ""
        except BadSample as e:
            if on_bad == "error":
                raise ValueError(f"bad sample {_where(split, ident, image)}: {e}. Fix or remove it, "
                                 "or set prepare.on_bad_sample: skip to drop such samples") from None
            log.debug("skipping %s: %s", _where(split, ident, image), e)
            image, captions, bad = None, [], e.reason
        out["image"].append(image)
        out["captions"].append(captions)
        out["bad"].append(bad)
    return out


def clean_split(split: Any, name: str, on_bad: str, cache_file: Path, num_proc: int = 0) -> tuple[Any, Counter]:
    """Rows (id, image: bytes/path, captions) -> (rows with decodable RGB images and captions, skipped by reason).

    Images are decoded once here (EXIF orientation, RGB; see images.py) and stored as bytes, so the
    feature extraction and the later stages read only good images.
    """
    import datasets

    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "captions": datasets.List(datasets.Value("string")), "bad": datasets.Value("string")})
    checked = split.map(_check_batch, batched=True, batch_size=64, features=features,
                        fn_kwargs={"split": name, "on_bad": on_bad}, cache_file_name=str(cache_file),
                        load_from_cache_file=False, num_proc=num_proc or None, desc=f"checking {name} images")
    bad = checked["bad"]
    skipped = Counter(r for r in bad if r)
    if skipped:
        log.warning("split '%s': skipped %d of %d samples (%s)", name, sum(skipped.values()), len(bad),
                    ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
    return checked.select([i for i, r in enumerate(bad) if not r]).remove_columns("bad"), skipped
