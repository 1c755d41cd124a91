"""Image folders in the Hugging Face imagefolder layout: images + metadata.jsonl or metadata.csv.

Each metadata row has `file_name` (relative to the metadata file) and a caption field holding one
caption or (JSON Lines only) a list; several rows with the same `file_name` add their captions up.
Splits: one metadata file at the top (a single split, "train"), or one per split subfolder
(train/, validation/, test/: the subfolder names are the split names).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

METADATA = ("metadata.jsonl", "metadata.csv")


def metadata_file(folder: Path) -> Path | None:
    return next((folder / m for m in METADATA if (folder / m).is_file()), None)


def read_metadata(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not valid JSON ({e.msg}): fix or remove that line") from None
    return rows


def read_split(folder: Path, caption_column: str) -> Any:
    """One split folder -> a Dataset (id = file_name, image = path, captions), one row per image."""
    import datasets

    meta = metadata_file(folder)
    rows = read_metadata(meta)
    fields = sorted(set().union(*rows)) if rows else []
    for key, param in (("file_name", "the HF imagefolder convention"),
                       (caption_column, "prepare.imagefolder.caption_column")):
        if rows and key not in fields:
            raise ValueError(f"{meta} has no field '{key}' ({param}); its fields: {', '.join(fields)}")
    captions: dict[str, list] = {}
    for row in rows:
        value = row.get(caption_column)
        captions.setdefault(str(row.get("file_name") or ""), []).extend(value if isinstance(value, list) else [value])
    return datasets.Dataset.from_dict(
        {"id": list(captions), "image": [str(folder / f) if f else "" for f in captions],
         "captions": list(captions.values())},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Value("string"),
                                    "captions": datasets.List(datasets.Value("string"))}))


def read_imagefolder(root: Path, caption_column: str) -> dict[str, Any]:
    """{split name: Dataset(id, image path, captions)} for an image folder."""
    if not root.is_dir():
        raise FileNotFoundError(f"prepare.imagefolder.path: {root} is not a directory")
    if metadata_file(root):
        return {"train": read_split(root, caption_column)}
    found = {d.name: read_split(d, caption_column) for d in sorted(root.iterdir()) if d.is_dir() and metadata_file(d)}
    if not found:
        holds = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "nothing"
        raise ValueError(f"image folder {root} has no {' or '.join(METADATA)}, neither at its top level nor in split "
                         f"subfolders (it holds: {holds})")
    return found
