"""WebDataset shards as written by img2dataset (CC3M, CC12M, LAION): `.tar` files whose members
`<key>.jpg` / `<key>.txt` / `<key>.json` form one sample each; sidecar `.parquet` / `_stats.json`
files beside the shards are ignored. `prepare.webdataset.path` is a shard folder, one `.tar`, a glob
(`shards/*.tar`) or a brace pattern (`shards/{00000..00331}.tar`).

Shards are read in order as a stream, one member at a time; a sample without an image or caption
member is kept with None there, so `samples.py` counts it as a bad sample (or stops on it).
"""

from __future__ import annotations

import glob
import tarfile
from pathlib import Path
from typing import Any, Iterator

from braceexpand import braceexpand


def shard_paths(pattern: str) -> list[Path]:
    """The `.tar` files a folder, file, glob or brace pattern names, sorted within each pattern."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.tar"))
        if not found:
            holds = ", ".join(sorted(p.name for p in path.iterdir())[:8])
            raise ValueError(f"prepare.webdataset.path={pattern!r} is a folder with no .tar shards (it holds: "
                             f"{holds}). Fix: point it at the folder img2dataset wrote its shards to")
        return found
    paths: list[Path] = []
    for part in braceexpand(str(path)):
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        missing = [m for m in matches if not Path(m).is_file()]
        if missing or not matches:
            raise ValueError(f"prepare.webdataset.path={pattern!r}: no shard {missing[0] if missing else part!r}. "
                             "Fix: give a folder of .tar shards, a glob or a brace pattern of existing files")
        paths += [Path(m) for m in matches if m.endswith(".tar")]
    if not paths:
        raise ValueError(f"prepare.webdataset.path={pattern!r} names no .tar file")
    return paths


def _split_name(name: str) -> tuple[str, str]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'): the key is everything before the first dot of the basename."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_samples(paths: list[Path], image_exts: tuple[str, ...] | list[str], caption_ext: str) -> Iterator[dict[str, Any]]:
    """{"id", "image": {"bytes", "path"} or None, "captions": str or None} per sample key, shard by shard."""
    for shard in paths:
        current: dict[str, Any] | None = None
        try:
            with tarfile.open(shard, mode="r|*") as tar:  # a stream: members in order, no index, no seeks
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_name(member.name)
                    if current is not None and current["id"] != f"{shard.name}/{key}":
                        yield current
                        current = None
                    if current is None:
                        current = {"id": f"{shard.name}/{key}", "image": None, "captions": None}
                    if ext in image_exts and current["image"] is None:
                        current["image"] = {"bytes": tar.extractfile(member).read(),
                                            "path": f"{shard}/{member.name}"}
                    elif ext == caption_ext:
                        current["captions"] = tar.extractfile(member).read().decode("utf-8", "replace")
        except tarfile.TarError as e:
            raise ValueError(f"shard {shard} is not a readable tar file ({e}). Fix: re-download it or remove it "
                             "from prepare.webdataset.path") from None
        if current is not None:
            yield current


def read_webdataset(pattern: str, image_exts: list[str], caption_ext: str, work_dir: Path) -> dict[str, Any]:
    """{"train": Dataset(id, image (undecoded), captions)}: all shards as one split (img2dataset has none)."""
    import datasets

    paths = shard_paths(pattern)
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(decode=False),
                                  "captions": datasets.Value("string")})
    # `datasets` shards a generator over its list arguments: only `paths` may be a list (one shard per .tar).
    ds = datasets.Dataset.from_generator(
        iter_samples, gen_kwargs={"paths": paths, "image_exts": tuple(image_exts), "caption_ext": caption_ext},
        features=features, cache_dir=str(work_dir / "webdataset"))
    return {"train": ds}
