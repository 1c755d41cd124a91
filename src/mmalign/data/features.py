"""Feature cache: run the frozen encoders once per dataset, train both phases from the result.

One cache directory per modality (image, audio: modalities.py), one file per split:
  <split>.safetensors   features (N, D) of the modality's frozen encoder, text (M, Dt) of the captions,
                        text_to_item (M,) int64: the item (image, clip) each caption describes
  fingerprint.json      modality, models, pooling, preprocessing, dataset fingerprints, a sha256 per file
A cache whose fingerprint or checksum does not match is rebuilt, never trusted (FuseMix and
ClipCap train from precomputed features the same way).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from ..models.encoders import FrozenTextEncoder
from ..training import distributed
from ..utils import DTYPES, atomic_path, prefetch, progress, read_json

log = logging.getLogger(__name__)


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # feature tensors


class StreamedRows:
    """A 2-D tensor of a safetensors file whose rows are read on demand (pread), never all at once.

    Indexing with an int, a slice or a LongTensor of row ids returns a new tensor of those rows, so
    training holds one batch of features, not the cache: the process's memory does not grow with the
    dataset (the OS page cache keeps a file that fits in RAM warm). Unlike np.memmap, rows read this
    way do not count towards the process's resident set.
    """

    def __init__(self, path: str | Path, name: str):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            meta = json.loads(f.read(size))[name]
        if len(meta["shape"]) != 2 or meta["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}:{name} is {meta['dtype']} {meta['shape']}; expected a 2-D float tensor")
        self.dtype, self.shape = _DTYPES[meta["dtype"]], torch.Size(meta["shape"])
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        self.offset = 8 + size + meta["data_offsets"][0]
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, start: int, rows: int, out: torch.Tensor) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        got = os.preadv(self._fd, [view], self.offset + start * self.row_bytes)
        if got != rows * self.row_bytes:
            raise ValueError(f"feature cache file {self.path} is truncated: rebuild it with "
                             "`dvc repro --force -s prepare`")

    def __getitem__(self, index: int | slice | torch.Tensor) -> torch.Tensor:
        if isinstance(index, int):
            return self[index:index + 1][0]
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self[torch.arange(start, stop, step)]
            out = torch.empty(max(0, stop - start), self.shape[1], dtype=self.dtype)
            if len(out):
                self._read(start, len(out), out)
            return out.float()  # a float16 cache halves disk and I/O; the adapters compute in float32
        rows = torch.as_tensor(index).long().reshape(-1)  # (B,)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows of {self.path}")
        out = torch.empty(len(rows), self.shape[1], dtype=self.dtype)
        for i, r in enumerate(rows.tolist()):  # one pread per row: ~1 ms for a batch of 256
            self._read(r, 1, out[i])
        return out.float()

    def load(self) -> torch.Tensor:
        """All rows as one tensor."""
        return self[:]

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen the file
        return {**self.__dict__, "_fd": None}


@dataclass
class Features:
    """One split of one modality's cache: item features, caption features, which item each caption is of."""

    items: torch.Tensor | StreamedRows  # (N, D) frozen-encoder features of the images / clips
    text: torch.Tensor | StreamedRows  # (M, Dt)
    text_to_item: torch.Tensor  # (M,) item index of each caption

    @property
    def num_items(self) -> int:
        return self.items.shape[0]

    # the image modality's names (the seed's vocabulary), kept for code written against them
    vision = property(lambda self: self.items)
    text_to_image = property(lambda self: self.text_to_item)
    num_images = num_items


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(name: str) -> str:
    """Hash of a local model's weight files; the name itself for hub ids (their revision pins them)."""
    path = Path(name)
    if not path.is_dir():
        return name
    h = hashlib.sha256()
    for f in sorted(path.rglob("*.safetensors")):
        h.update(sha256(f).encode())
    return h.hexdigest()


class _Column(torch.utils.data.Dataset):
    """One column of an HF dataset split: the media (PIL images, audio file bytes) the encoder preprocesses."""

    def __init__(self, split: Any, column: str):
        self.split, self.column = split.select_columns([column]), column

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.split[i][self.column]

    def __getitems__(self, indices: list[int]) -> list:  # the DataLoader fetches a batch in one Arrow read
        return self.split[indices][self.column]


def _batches(n: int, size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Row indices of the batches this rank encodes: batch b goes to rank b % world. Batches are the
    same whatever the number of processes, so a sharded cache equals the 1-process one byte for byte."""
    return [list(range(b, min(b + size, n))) for b in range(rank * size, n, world * size)]


@torch.inference_mode()
def encode_items(split: Any, encoder: Any, column: str, batch_size: int, num_workers: int = 0, desc: str = "",
                 overlap: bool = True, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """The features of this rank's batches of an HF dataset split's media `column`, (B, dim) each.

    `encoder`: a frozen encoder (preprocess(list of column values) -> batch, forward(batch) -> (B, dim)).
    With `overlap`, the next batch is decoded + preprocessed in a thread while this one runs through
    the encoder (benchmarks/bench_extraction.py measures both ways).
    """
    loader = DataLoader(_Column(split, column), batch_sampler=_batches(len(split), batch_size, rank, world),
                        num_workers=num_workers, collate_fn=encoder.preprocess)  # decode + preprocess
    batches = prefetch(loader) if overlap else loader
    return [encoder(x).cpu() for x in progress(batches, total=len(loader), desc=f"{column} features {desc}",
                                               unit="batch")]


def encode_images(split: Any, vision: Any, batch_size: int, num_workers: int = 0, desc: str = "",
                  overlap: bool = True, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """encode_items over the `image` column (benchmarks call it by this name)."""
    return encode_items(split, vision, "image", batch_size, num_workers, desc, overlap, rank, world)


def _text_to_item(captions: list[list[str]]) -> torch.Tensor:
    """(M,) item index of each caption, captions flattened in order."""
    return torch.tensor([i for i, caps in enumerate(captions) for _ in caps], dtype=torch.long)


TEXT_CHUNK = 2048  # captions per sentence-transformers call


def encode_captions(text: FrozenTextEncoder, flat: list[str], desc: str = "", rank: int = 0,
                    world: int = 1) -> list[torch.Tensor]:
    """The text features of this rank's chunks of `flat` captions, (n, dim) each, on the CPU."""
    # Large chunks: sentence-transformers sorts each call's texts by length before batching, so
    # batches hold similar lengths (2.7x faster than 256-caption calls on the default captions).
    chunks = _batches(len(flat), TEXT_CHUNK, rank, world)
    return [text(flat[c[0]:c[-1] + 1], batch_size=64).cpu()
            for c in progress(chunks, desc=f"text features {desc}", unit="chunk")]


@torch.inference_mode()
def encode_split(split: Any, encoder: Any, text: FrozenTextEncoder, column: str, batch_size: int,
                 num_workers: int = 0, desc: str = "", rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """Run the modality's frozen encoder and the text encoder over one HF dataset split (columns: `column`,
    captions).

    With world > 1, this rank's share only: tensors `features.<batch>` and `text.<chunk>` (merge_shards
    puts the shares of all ranks back in order)."""
    v = encode_items(split, encoder, column, batch_size, num_workers, desc, rank=rank, world=world)
    captions = split["captions"]
    t = encode_captions(text, [c for caps in captions for c in caps], desc, rank, world)
    if world > 1:
        return {**{f"features.{rank + i * world}": x for i, x in enumerate(v)},
                **{f"text.{rank + i * world}": x for i, x in enumerate(t)}}
    return {"features": torch.cat(v).contiguous(), "text": torch.cat(t).contiguous(),
            "text_to_item": _text_to_item(captions)}


def merge_shards(parts: list[dict[str, torch.Tensor]], captions: list[list[str]]) -> dict[str, torch.Tensor]:
    """The per-rank tensors of encode_split(world > 1) -> the 1-process result."""
    pieces = {k: v for part in parts for k, v in part.items()}
    ordered = lambda kind: [pieces[k] for k in sorted((k for k in pieces if k.startswith(kind + ".")),  # noqa: E731
                                                      key=lambda k: int(k.split(".")[1]))]
    return {"features": torch.cat(ordered("features")).contiguous(), "text": torch.cat(ordered("text")).contiguous(),
            "text_to_item": _text_to_item(captions)}


def cache_fingerprint(dataset: Any, encoder: Any, text: FrozenTextEncoder, modality: str) -> dict[str, Any]:
    """What the cache of `modality` depends on: both models (weights hashed when local), the pooling, the
    preprocessing as the processor reports it, and each split's dataset fingerprint."""
    return {
        "modality": modality, "model": encoder.name, "weights": model_fingerprint(encoder.name),
        "pooling": encoder.pooling, "grid": encoder.grid,
        "text_model": text.name, "text_weights": model_fingerprint(text.name),
        "preprocessing": json.loads(json.dumps(encoder.processor.to_dict())),  # as read back (tuples -> lists)
        "dataset": {name: split._fingerprint for name, split in dataset.items()},
    }


def build_feature_cache(dataset: Any, encoder: Any, text: FrozenTextEncoder, out_dir: str | Path,
                        batch_size: int = 128, num_workers: int = 0, dtype: str = "float32",
                        modality: str = "image", mixed_precision: str = "none") -> dict[str, Any]:
    """Encode every split of `dataset` (a DatasetDict whose media column is the modality's) and write the
    cache atomically (whole dir). mixed_precision: none | bf16 | auto (both encoders under bf16 autocast;
    auto: where the device computes bf16 natively); the fingerprint records the precision used.

    Under `accelerate launch` with N processes each encodes every N-th batch and writes its share to a
    shard file; rank 0 merges the shares into the cache the 1-process run writes (tests/test_features.py)."""
    out_dir = Path(out_dir)
    from ..modalities import modality as spec

    column = spec(modality).column
    device = next(text.parameters()).device
    precision = distributed.resolve_precision(device, mixed_precision)
    expected = {**cache_fingerprint(dataset, encoder, text, modality), "feature_dtype": dtype,
                "mixed_precision": precision}
    if cache_is_valid(out_dir, expected):
        log.info("feature cache %s is up to date; not re-encoding", out_dir)
        return read_json(out_dir / "fingerprint.json")
    stored = DTYPES[dtype]
    cast = lambda t: {k: v.to(stored) if k != "text_to_item" else v for k, v in t.items()}  # noqa: E731
    meta = {**expected, "dim": encoder.dim, "text_dim": text.dim}
    rank, world = distributed.rank(), distributed.world_size()
    autocast = lambda: distributed.autocast(device, precision)  # noqa: E731
    if world == 1:
        def splits() -> Iterable[tuple[str, dict[str, torch.Tensor]]]:  # one split in memory at a time
            for name, split in dataset.items():
                with autocast():
                    out = encode_split(split, encoder, text, column, batch_size, num_workers, desc=name)
                yield name, cast(out)
        return write_feature_cache(out_dir, splits(), meta)
    shard_dir = out_dir.parent / f".{out_dir.name}.shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for name, split in dataset.items():
        with autocast():
            part = encode_split(split, encoder, text, column, batch_size, num_workers, desc=name, rank=rank,
                                world=world)
        save_file({k: v.contiguous() for k, v in part.items()}, shard_dir / f"{name}.rank{rank}.safetensors")
    distributed.barrier()
    if distributed.is_main_process():
        splits = ((name, cast(merge_shards([load_file(shard_dir / f"{name}.rank{r}.safetensors")
                                            for r in range(world)], split["captions"])))
                  for name, split in dataset.items())
        meta = write_feature_cache(out_dir, splits, meta)
        shutil.rmtree(shard_dir, ignore_errors=True)
    distributed.barrier()
    return read_json(out_dir / "fingerprint.json")


def write_feature_cache(out_dir: str | Path, splits: Iterable[tuple[str, dict[str, torch.Tensor]]],
                        fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Write (name, {"features", "text", "text_to_item"}) splits and fingerprint.json (plus each file's
    sha256 and sizes) atomically: the directory appears whole or not at all."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        files = {}
        for name, tensors in splits:
            save_file(tensors, tmp / f"{name}.safetensors")
            files[name] = {"sha256": sha256(tmp / f"{name}.safetensors"), "items": tensors["features"].shape[0],
                           "captions": tensors["text"].shape[0]}
        fingerprint = {**fingerprint, "files": files}
        (tmp / "fingerprint.json").write_text(json.dumps(fingerprint, indent=2) + "\n")
    return fingerprint


def cache_is_valid(out_dir: str | Path, expected: dict[str, Any]) -> bool:
    path = Path(out_dir) / "fingerprint.json"
    if not path.exists():
        return False
    try:
        found = read_json(path)
    except ValueError:
        return False
    if any(found.get(k) != v for k, v in expected.items()):
        log.warning("feature cache %s was built from other models or data; rebuilding", out_dir)
        return False
    for name, meta in found.get("files", {}).items():
        f = Path(out_dir) / f"{name}.safetensors"
        if not f.exists() or sha256(f) != meta["sha256"]:
            log.warning("feature cache file %s is missing or corrupt (checksum mismatch); rebuilding", f)
            return False
    return True


def load_features(cache_dir: str | Path, split: str, stream: bool = False) -> Features:
    """Load one split, verifying its checksum against fingerprint.json.

    stream=True: item and text features stay in the file (StreamedRows) and are read a batch at a
    time; only text_to_item is loaded.
    """
    cache_dir = Path(cache_dir)
    meta = read_json(cache_dir / "fingerprint.json")
    if split not in meta.get("files", {}):
        raise ValueError(f"feature cache {cache_dir} has no split '{split}' (has: {', '.join(meta.get('files', {}))})")
    f = cache_dir / f"{split}.safetensors"
    if sha256(f) != meta["files"][split]["sha256"]:
        raise ValueError(f"feature cache file {f} does not match its checksum: rebuild it with "
                         "`dvc repro --force -s prepare` (DVC cannot see damage that keeps size and mtime)")
    if stream:
        with safe_open(f, framework="pt") as st:
            t2i = st.get_tensor("text_to_item")
        return Features(StreamedRows(f, "features"), StreamedRows(f, "text"), t2i)
    t = load_file(f)
    return Features(t["features"].float(), t["text"].float(), t["text_to_item"])
