"""Datasets and loaders: raw image-caption pairs (the seed API) and cached-feature batches."""

from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset


class ImageTextDataset(Dataset):
    """Image-caption pairs from a Hugging Face dataset or a list of dicts.

    Each row has an `image` (PIL image or path) and `captions` (list of strings) or `caption`.
    Item i yields {"image": PIL.Image, "caption": str}: a caption drawn at random (seeded) from
    the row's captions when `caption_sampling="random"`, the first one when "first".
    """

    def __init__(self, rows: Sequence[dict[str, Any]] | Any, caption_sampling: str = "random", seed: int = 0):
        if caption_sampling not in ("random", "first"):
            raise ValueError(f"caption_sampling={caption_sampling!r}: allowed: random, first")
        if len(rows) == 0:
            raise ValueError("ImageTextDataset got an empty dataset: check the split and its source")
        self.rows = rows
        self.caption_sampling = caption_sampling
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        captions = row["captions"] if "captions" in row else [row["caption"]]
        caption = captions[0] if self.caption_sampling == "first" else self.rng.choice(captions)
        image = row["image"]
        return {"image": image if isinstance(image, Image.Image) else Image.open(image), "caption": caption}


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, list]:
    """Keep PIL images and strings as lists: the frozen encoders batch them themselves."""
    return {"images": [it["image"] for it in items], "texts": [it["caption"] for it in items]}


def create_dataloader(dataset: Dataset, batch_size: int = 32, shuffle: bool = True, num_workers: int = 0,
                      seed: int = 0, drop_last: bool = True) -> DataLoader:
    """DataLoader over ImageTextDataset. drop_last by default: a contrastive batch of 1 has no negatives."""
    if batch_size < 2:
        raise ValueError(f"batch_size={batch_size}: must be >= 2 for a contrastive loss")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate_pairs, drop_last=drop_last, generator=generator)


class FeaturePairBatches:
    """Batches of cached (vision, text) feature pairs: every image once per epoch with one of its captions.

    vision (N, Dv), text (M, Dt), text_to_image (M,). Epoch e is a pure function of (seed, e), so a
    run restarted at epoch e sees the same batches. Yields {"vision_features", "text_features"}.
    """

    def __init__(self, vision: torch.Tensor, text: torch.Tensor, text_to_image: torch.Tensor,
                 batch_size: int, seed: int = 0, drop_last: bool = True):
        n = vision.shape[0]
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} is larger than the {n} training images: lower the batch size")
        self.vision, self.text, self.batch_size, self.seed, self.drop_last = vision, text, batch_size, seed, drop_last
        order = torch.argsort(text_to_image, stable=True)
        counts = torch.bincount(text_to_image, minlength=n)
        if (counts == 0).any():
            raise ValueError(f"{int((counts == 0).sum())} images have no caption in the feature cache")
        self.caption_order, self.counts = order, counts
        self.starts = torch.cumsum(counts, 0) - counts
        self.epoch = 0

    def __len__(self) -> int:
        n = self.vision.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = self.vision.shape[0]
        perm = torch.randperm(n, generator=g)
        pick = (torch.rand(n, generator=g) * self.counts).long()  # which caption of each image
        caption_idx = self.caption_order[self.starts + pick]  # (N,)
        for b in range(len(self)):
            idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
            yield {"vision_features": self.vision[idx], "text_features": self.text[caption_idx[idx]]}


class PairBatches:
    """Each step, one FeaturePairBatches batch of every modality: {"<modality>.features", "<modality>.text"}.

    An epoch is as long as the largest modality's; a smaller one starts over within the epoch (its k-th
    pass of epoch e is its own epoch e * passes + k), so every step has a batch of every modality and
    epoch e is still a pure function of (seed, e).
    """

    def __init__(self, loaders: dict[str, FeaturePairBatches]):
        self.loaders, self.epoch = loaders, 0

    def __len__(self) -> int:
        return max(len(loader) for loader in self.loaders.values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _stream(self, loader: FeaturePairBatches) -> Iterator[dict[str, torch.Tensor]]:
        passes = -(-len(self) // len(loader))
        for k in range(passes):
            loader.set_epoch(self.epoch * passes + k)
            yield from loader

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        streams = {m: self._stream(loader) for m, loader in self.loaders.items()}
        for _ in range(len(self)):
            batch = {}
            for m, stream in streams.items():
                b = next(stream)
                batch[f"{m}.features"], batch[f"{m}.text"] = b["vision_features"], b["text_features"]
            yield batch


class CaptionBatches:
    """Batches of (cached vision feature, caption token ids): every caption once per epoch.

    vision (N, Dv); captions: M token-id lists; text_to_image (M,). Epoch e depends only on (seed, e).
    With `group_by_length`, each run of `megabatch` batches of the epoch's shuffle is sorted by caption
    length before it is cut into batches, and the batches are shuffled (HF's LengthGroupedSampler):
    rows of a batch have similar lengths, so little of a step is padding. Unshuffled (val), batches
    are simply in length order. megabatch 4, not HF's 50: on the default data (141 batches an epoch)
    it still cuts the positions run by 26% (50: 34%) while batches stay mixed. Yields {key: (B, Dv) rows of
    `vision`, "captions": list of B id lists} (+ "modality" when given). `vision`: cached features
    (key "vision_features") or the aligned embeddings z of the items (key "z", what the project stage uses).
    """

    def __init__(self, vision: torch.Tensor, captions: list[list[int]], text_to_image: torch.Tensor,
                 batch_size: int, seed: int = 0, shuffle: bool = True, group_by_length: bool = False,
                 megabatch: int = 4, key: str = "vision_features", modality: str | None = None,
                 one_per_item: bool = False):
        if len(captions) != len(text_to_image):
            raise ValueError(f"{len(captions)} captions but {len(text_to_image)} caption->image indices")
        self.vision, self.captions, self.t2i = vision, captions, text_to_image
        self.batch_size, self.seed, self.shuffle, self.epoch = batch_size, seed, shuffle, 0
        self.group_by_length, self.megabatch, self.key, self.modality = group_by_length, megabatch, key, modality
        self.lengths = torch.tensor([len(c) for c in captions], dtype=torch.long)  # (M,)
        self.one_per_item = one_per_item  # an epoch: every item once, with one of its captions drawn (seeded)
        n = int(text_to_image.max()) + 1 if len(text_to_image) else 0
        self.counts = torch.bincount(text_to_image, minlength=n)  # (N,) captions per item
        self.caption_order = torch.argsort(text_to_image, stable=True)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def __len__(self) -> int:
        rows = len(self.counts) if self.one_per_item else len(self.captions)
        return -(-rows // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batch_indices(self) -> list[torch.Tensor]:
        """Caption indices of each batch of the current epoch (a pure function of seed and epoch)."""
        m, bs = len(self.captions), self.batch_size
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.one_per_item:
            pick = (torch.rand(len(self.counts), generator=g) * self.counts).long()  # which caption of each item
            chosen = self.caption_order[self.starts + pick]  # (N,) caption indices
            order = chosen[torch.randperm(len(chosen), generator=g)] if self.shuffle else chosen
        else:
            order = torch.randperm(m, generator=g) if self.shuffle else torch.arange(m)
        if not self.group_by_length:
            return list(order.split(bs))
        if not self.shuffle:
            return list(order[torch.argsort(self.lengths[order], descending=True, stable=True)].split(bs))
        # megabatches are whole multiples of the batch size, so no batch straddles two of them
        groups = [mega[torch.argsort(self.lengths[mega], descending=True, stable=True)]
                  for mega in order.split(bs * self.megabatch)]
        batches = list(torch.cat(groups).split(bs))
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        tag = {"modality": self.modality} if self.modality else {}
        for idx in self.batch_indices():
            yield {self.key: self.vision[self.t2i[idx]], "captions": [self.captions[i] for i in idx.tolist()], **tag}


class MixedBatches:
    """The batches of several loaders (one per modality), each epoch in one seeded random order: every
    batch holds one modality (its own prompt), the epoch holds all of them. `passes[m]` (default 1): how
    many times an epoch goes through modality m's batches (its k-th pass of epoch e is its own epoch
    e * passes + k), so a small modality can get as many steps as a large one."""

    def __init__(self, loaders: dict[str, Any], seed: int = 0, passes: dict[str, int] | None = None):
        self.loaders, self.seed, self.epoch = loaders, seed, 0
        self.passes = {m: (passes or {}).get(m, 1) for m in loaders}

    def __len__(self) -> int:
        return sum(len(loader) * self.passes[m] for m, loader in self.loaders.items())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _stream(self, m: str) -> Iterator[dict[str, Any]]:
        for k in range(self.passes[m]):
            self.loaders[m].set_epoch(self.epoch * self.passes[m] + k)
            yield from self.loaders[m]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7)
        order = [m for m, loader in self.loaders.items() for _ in range(len(loader) * self.passes[m])]
        streams = {m: self._stream(m) for m in self.loaders}
        for i in torch.randperm(len(order), generator=g).tolist():
            yield next(streams[order[i]])
