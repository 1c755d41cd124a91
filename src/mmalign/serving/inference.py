"""A trained checkpoint outside the pipeline: load it, read images, embed at a Matryoshka dim, rank, caption.

The `mmalign` command (cli.py) and the MLflow pyfunc (tracking.py) are thin layers over these functions.
Every problem a user can fix (a missing checkpoint, an unreadable image, a bad dim) is an `InputError`
whose message names the file or value and what to do.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from PIL import Image

from ..data.images import BadSample, open_rgb
from ..models.aligner import VisionTextAligner
from ..models.encoders import ModelLoadError
from ..models.llm import MultimodalLLM
from ..training.losses import matryoshka_prefix
from ..utils import get_device, progress, read_json

log = logging.getLogger(__name__)

# Extensions PIL can open (.png, .jpg, .webp, ...), for listing a directory.
IMAGE_SUFFIXES = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


class InputError(ValueError):
    """A problem with what the user gave (paths, checkpoints, values); the message says what to fix."""


# -- inputs ------------------------------------------------------------------------------------------
def list_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, directories expanded to the image files under them (sorted, hidden files skipped)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise InputError(f"no images in directory {p} (no .png, .jpg, .webp or other file PIL opens)")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"image {p} does not exist")
    if not out:
        raise InputError("no images given")
    return out


def load_image(path: str | Path) -> Image.Image:
    """An image file -> upright RGB (the same decoding `prepare` applies to training images)."""
    try:
        return open_rgb(Path(path).read_bytes())[0]
    except BadSample as e:
        raise InputError(f"cannot read image {path}: {e}") from None
    except OSError as e:
        raise InputError(f"cannot read image {path}: {e.strerror or e}") from None


def load_images(paths: Sequence[str | Path], skipped: list[tuple[Path, str]] | None = None
                ) -> tuple[list[Path], list[Image.Image]]:
    """Image files -> (the paths that were read, their images). `skipped` None: an unreadable file raises
    InputError; a list: the file is left out with a warning, and (path, reason) appended to the list."""
    kept: list[Path] = []
    images: list[Image.Image] = []
    for path in map(Path, paths):
        try:
            images.append(load_image(path))
        except InputError as e:
            if skipped is None:
                raise
            log.warning("skipped: %s", e)
            skipped.append((path, str(e)))
            continue
        kept.append(path)
    return kept, images


def decode_image(value: bytes | bytearray | str, name: str = "image") -> Image.Image:
    """Encoded image bytes, or the same as base64 (a string, or its ASCII bytes: MLflow's scoring server
    decodes base64 for `dataframe_split`/`dataframe_records` payloads but passes the text of `inputs` and
    `instances` through as bytes) -> upright RGB."""
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"{name}: not valid base64 ({e})") from None
    if not isinstance(value, (bytes, bytearray)):
        raise InputError(f"{name}: expected image bytes or a base64 string, got {type(value).__name__}")
    try:
        return open_rgb(bytes(value))[0]
    except BadSample as e:
        error = e
    try:
        decoded = base64.b64decode(bytes(value), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{name}: {error}") from None
    try:
        return open_rgb(decoded)[0]
    except BadSample as e:
        raise InputError(f"{name}: {e}") from None


def read_texts(values: Iterable[str]) -> list[str]:
    """Each value is a text file (one text per non-empty line) when such a file exists, else a text itself."""
    texts: list[str] = []
    for v in values:
        p = Path(v)
        if p.is_file():
            lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
            texts += [line for line in lines if line]
        elif p.suffix.lower() in (".txt", ".csv", ".tsv") and " " not in v:
            raise InputError(f"text file {v} does not exist")
        elif v.strip():
            texts.append(v)
    if not texts:
        raise InputError("no texts given (empty strings and empty files do not count)")
    return texts


@contextlib.contextmanager
def batched(items: Sequence, batch_size: int, desc: str, unit: str = "item") -> Iterator[Iterator[Sequence]]:
    """Slices of `items` with a progress bar counted in items. A context manager, so the bar is closed
    before an error inside the loop is reported (its message then starts on a line of its own)."""
    with progress(total=len(items), desc=desc, unit=unit) as bar:
        def chunks() -> Iterator[Sequence]:
            for i in range(0, len(items), batch_size):
                yield items[i:i + batch_size]
                bar.update(min(batch_size, len(items) - i))
        yield chunks()


# -- checkpoints -------------------------------------------------------------------------------------
# An exported model directory (export.py) holds this manifest beside its aligner/ and projector/.
MANIFEST = "mmalign.json"


def export_root(checkpoint_dir: str | Path) -> Path | None:
    """The export directory a checkpoint lies in, or None for a pipeline checkpoint."""
    parent = Path(checkpoint_dir).resolve().parent
    return parent if (parent / MANIFEST).is_file() else None


def resolve_model_name(name: str, root: Path | None) -> str:
    """A model name from an exported config: a path inside the export -> that path; anything else as is."""
    if root is None or not name or Path(name).is_absolute():
        return name
    inside = root / name
    return str(inside) if inside.exists() else name


def _check_checkpoint(directory: str | Path, what: str, option: str) -> Path:
    d = Path(directory)
    if not (d / "model.safetensors").is_file() or not (d / "config.json").is_file():
        reason = "does not exist" if not d.exists() else "has no model.safetensors + config.json"
        raise InputError(f"{what} checkpoint {d} {reason}: train it (`dvc repro`) or pass {option}")
    return d


def _model_error(e: ModelLoadError, checkpoint: Path, key: str, name: str) -> InputError:
    where = f"the {key} '{name}' named in {checkpoint}/config.json"
    if Path(name).expanduser().exists():
        return InputError(f"{where} does not load: {e}")
    if Path(name).is_absolute():
        return InputError(f"{where} does not exist: export the model with `mmalign export --copy-models` "
                          "to carry the frozen models inside it")
    # Checkpoints name their models as `prepare` wrote them: paths relative to the repo root.
    return InputError(f"{where} is not a directory under {os.getcwd()} ({str(e).split('. Fix:')[0]}): "
                      "run mmalign from the repo root the checkpoint was trained in, or export it (`mmalign export`) "
                      "and pass --model")


def _exported_names(checkpoint: Path, keys: Sequence[str]) -> dict[str, str]:
    """In an export directory (export.py), models copied in are named relative to it: resolve them."""
    root = export_root(checkpoint)
    if root is None:
        return {}
    cfg = read_json(checkpoint / "config.json")
    return {k: resolve_model_name(cfg[k], root) for k in keys if cfg.get(k)}


def model_dirs(model_dir: str | Path) -> tuple[Path, Path | None]:
    """An exported model directory -> (aligner dir, projector dir or None); InputError if it is not one."""
    d = Path(model_dir)
    if not (d / MANIFEST).is_file():
        raise InputError(f"{d} is not an exported mmalign model (no {MANIFEST}): write one with "
                         f"`mmalign export --out {d}` from the repo root")
    manifest = read_json(d / MANIFEST)
    return d / manifest["aligner"], (d / manifest["projector"]) if manifest.get("projector") else None


def from_pretrained(model_dir: str | Path, device: str = "auto") -> MultimodalLLM | VisionTextAligner:
    """An exported model directory (`mmalign export`), from any working directory, in eval mode: the
    captioner (MultimodalLLM; its `.aligner` embeds), or the aligner when the export has no projector."""
    aligner_dir, projector_dir = model_dirs(model_dir)
    device = resolve_device(device)
    if projector_dir is None:
        return load_aligner(aligner_dir, (), device=device)
    return load_captioner(aligner_dir, projector_dir, device=device)


def resolve_device(device: str = "auto") -> str:
    return get_device() if device == "auto" else device


def load_aligner(aligner_dir: str | Path, need: Sequence[str] = ("vision",), vision: str | None = None,
                 device: str = "cpu", dim: int | None = None) -> VisionTextAligner:
    """A Phase 1 checkpoint in eval mode, with the frozen encoders named in `need` loaded now (so a missing
    encoder fails here with a clear message). `vision` overrides the vision encoder path it was trained with;
    `dim`, if given, is checked against the checkpoint before any encoder loads."""
    d = _check_checkpoint(aligner_dir, "aligner", "--aligner")
    overrides = {**_exported_names(d, ("vision_model_name", "text_model_name")),
                 **({"vision_model_name": str(vision)} if vision else {})}
    try:
        model = VisionTextAligner.from_pretrained(d, device=device, **overrides).eval()
        check_dim(model, dim)
        for tower in need:
            getattr(model, f"{tower}_encoder")
    except ModelLoadError as e:
        name = vision or read_json(d / "config.json")["vision_model_name"]
        raise _model_error(e, d, "vision encoder", name) from None
    except ValueError as e:  # a config.json that no longer matches the code, or a corrupt checkpoint
        raise InputError(str(e)) from None
    return model


def load_captioner(aligner_dir: str | Path, projector_dir: str | Path, llm: str | None = None,
                   vision: str | None = None, device: str = "cpu") -> MultimodalLLM:
    """Aligner + projector checkpoints -> MultimodalLLM in eval mode. The projector's config.json names the
    LLM (`model_name`); `llm`/`vision` override the model paths the checkpoints were trained with."""
    aligner = load_aligner(aligner_dir, ("vision",), vision, device)
    d = _check_checkpoint(projector_dir, "projector", "--projector")
    overrides = {**_exported_names(d, ("model_name",)), **({"model_name": str(llm)} if llm else {})}
    try:
        mm = MultimodalLLM.from_pretrained(d, aligner, **overrides)
    except ModelLoadError as e:
        raise _model_error(e, d, "LLM", llm or read_json(d / "config.json")["model_name"]) from None
    return mm.to(device).eval()


def _none_read(paths: Sequence, skipped: list[tuple[Path, str]] | None) -> InputError:
    first = f": {skipped[0][1]}" if skipped else ""
    return InputError(f"none of the {len(paths)} images could be read{first}")


# -- embeddings --------------------------------------------------------------------------------------
def trained_dims(aligner: VisionTextAligner) -> list[int]:
    """The embedding sizes the Matryoshka loss trained: the checkpoint's mrl_dims and the full d_align."""
    return sorted({*aligner.cfg.mrl_dims, aligner.cfg.d_align})


def check_dim(aligner: VisionTextAligner, dim: int | None) -> int:
    """The embedding size to use: `dim`, or the full d_align when None. A prefix size the loss never
    trained is refused (its embeddings are not aligned: nothing pulled matching pairs together at it)."""
    if dim is None:
        return aligner.cfg.d_align
    dims = trained_dims(aligner)
    if dim not in dims:
        raise InputError(f"--dim {dim} was not trained: this aligner's Matryoshka dims are "
                         f"{', '.join(map(str, dims))}; pass one of them")
    return dim


@torch.inference_mode()
def embed_images(aligner: VisionTextAligner, paths: Sequence[str | Path], dim: int | None = None,
                 batch_size: int = 64, skipped: list[tuple[Path, str]] | None = None) -> torch.Tensor:
    """Image files -> unit-norm embeddings (N, dim), in the order given. `skipped`: see load_images (the
    rows of skipped files are left out)."""
    dim = check_dim(aligner, dim)
    out = []
    with batched(paths, batch_size, "embedding images", "image") as chunks:
        for chunk in chunks:
            images = load_images(chunk, skipped)[1]
            if images:
                out.append(aligner.encode_images(images).cpu())
    if not out:
        raise _none_read(paths, skipped)
    return matryoshka_prefix(torch.cat(out), dim)


@torch.inference_mode()
def embed_texts(aligner: VisionTextAligner, texts: Sequence[str], dim: int | None = None,
                batch_size: int = 256) -> torch.Tensor:
    """Texts -> unit-norm embeddings (N, dim)."""
    dim = check_dim(aligner, dim)
    with batched(texts, batch_size, "embedding texts", "text") as chunks:
        out = [aligner.encode_texts(list(chunk)).cpu() for chunk in chunks]
    return matryoshka_prefix(torch.cat(out), dim)


def rank(query: torch.Tensor, candidates: torch.Tensor, top_k: int) -> tuple[list[int], list[float]]:
    """query (d,), candidates (N, d), both unit-norm -> indices and cosine scores of the top_k, best first."""
    scores = candidates @ query  # (N,)
    top = torch.topk(scores, min(top_k, scores.shape[0]))
    return top.indices.tolist(), top.values.tolist()


# -- captions ----------------------------------------------------------------------------------------
def caption_files(mm: MultimodalLLM, paths: Sequence[str | Path], prompt: str | None = None,
                  max_new_tokens: int = 48, batch_size: int = 16,
                  skipped: list[tuple[Path, str]] | None = None) -> list[str]:
    """Image files -> one greedy caption each. `prompt` None: the prompt the projector was trained with.
    `skipped`: see load_images (skipped files get no caption)."""
    prompt = mm.cfg.prompt if prompt is None else prompt
    captions: list[str] = []
    with batched(paths, batch_size, "captioning", "image") as chunks:
        for chunk in chunks:
            images = load_images(chunk, skipped)[1]
            if images:
                captions += mm.generate(images, prompt=prompt, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if not captions and paths:
        raise _none_read(paths, skipped)
    return captions
