"""A trained checkpoint outside the pipeline: load it, read images and audio, embed at a Matryoshka dim, rank,
caption.

The `mmalign` command (cli.py) and the MLflow pyfunc (tracking.py) are thin layers over these functions.
Every problem a user can fix (a missing checkpoint, an unreadable file, a bad dim) is an `InputError`
whose message names the file or value and what to do.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import torch
from PIL import Image

from ..data.images import BadSample, open_rgb
from ..modalities import MODALITIES
from ..models.aligner import VisionTextAligner
from ..models.encoders import ModelLoadError
from ..models.llm import MultimodalLLM
from ..training.losses import matryoshka_prefix
from ..utils import get_device, progress, read_json

log = logging.getLogger(__name__)
T = TypeVar("T")

# Extensions PIL can open (.png, .jpg, .webp, ...), for listing a directory.
IMAGE_SUFFIXES = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
AUDIO_SUFFIXES = frozenset((".wav", ".flac", ".ogg", ".mp3"))  # what soundfile (libsndfile) decodes
SUFFIXES = {"image": IMAGE_SUFFIXES, "audio": AUDIO_SUFFIXES}
FORMATS = {"image": ".png, .jpg, .webp or other file PIL opens", "audio": ".wav, .flac, .ogg or .mp3"}
NOUNS = {"image": "image", "audio": "audio file", None: "file"}  # None: a mix of modalities


class InputError(ValueError):
    """A problem with what the user gave (paths, checkpoints, values); the message says what to fix."""


# -- inputs ------------------------------------------------------------------------------------------
def plural(modality: str | None, n: int = 2) -> str:
    """The noun of `modality` (None: of several) for n items: "images", "audio file", "files"."""
    return NOUNS[modality] + "s" * (n != 1)


def file_modality(path: str | Path) -> str:
    """The modality of a file by its extension: audio for .wav, .flac, .ogg, .mp3; image otherwise."""
    return "audio" if Path(path).suffix.lower() in AUDIO_SUFFIXES else "image"


def modalities_of(paths: Iterable[str | Path]) -> list[str]:
    """The modalities of these files by extension (file_modality), in the order of the modalities table."""
    found = {file_modality(p) for p in paths}
    return [m for m in MODALITIES if m in found]


def modality_of(paths: Iterable[str | Path]) -> str | None:
    """The one modality of these files by extension, or None when they mix modalities (or there are none)."""
    found = modalities_of(paths)
    return found[0] if len(found) == 1 else None


def list_files(paths: Iterable[str | Path], modalities: Sequence[str] = ("image",),
               expand: Sequence[str] | None = None) -> list[Path]:
    """Files of `modalities` as given, directories expanded to the files under them of the modalities in `expand`
    (default: `modalities`), sorted, hidden files skipped."""
    expand = modalities if expand is None else expand
    suffixes = frozenset().union(*(SUFFIXES[m] for m in expand))
    nouns = " or ".join(plural(m) for m in expand)
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in suffixes and f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise InputError(f"no {nouns} in directory {p} (no {', no '.join(FORMATS[m] for m in expand)})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            one = modalities[0] if len(modalities) == 1 else file_modality(p)
            raise InputError(f"{NOUNS[one]} {p} does not exist")
    if not out:
        raise InputError(f"no {nouns} given")
    return out


def read_file(path: str | Path, decode: Callable[[bytes], T], noun: str = "image") -> T:
    """A file -> decode(its bytes); InputError naming the file when it cannot be read or decoded."""
    try:
        return decode(Path(path).read_bytes())
    except BadSample as e:
        raise InputError(f"cannot read {noun} {path}: {e}") from None
    except OSError as e:
        raise InputError(f"cannot read {noun} {path}: {e.strerror or e}") from None


def load_image(path: str | Path) -> Image.Image:
    """An image file -> upright RGB (the same decoding `prepare` applies to training images)."""
    return read_file(path, lambda data: open_rgb(data)[0])


def clip_decoder(aligner: VisionTextAligner) -> Callable[[Any], Any]:
    """Audio file bytes (or a path) -> a clip as the aligner's audio encoder takes it: mono float32 at its rate,
    cut to its window (what `prepare` does to training clips). Raises BadSample."""
    encoder = aligner.encoder("audio")
    return lambda value: encoder.load([value])[0]


def loader(aligner: VisionTextAligner, modality: str) -> Callable[[Path], Any]:
    """path -> what `aligner.encode(modality, ...)` takes; InputError for an unreadable file."""
    if modality == "image":
        return load_image
    decode = clip_decoder(aligner)
    return lambda path: read_file(path, decode, NOUNS[modality])


def load_files(paths: Sequence[str | Path], load: Callable[[Path], T] = load_image,
               skipped: list[tuple[Path, str]] | None = None) -> tuple[list[int], list[T]]:
    """Files -> (the positions in `paths` of those read, what `load` made of them). `skipped` None: an unreadable
    file raises InputError; a list: the file is left out with a warning, and (path, reason) appended to it."""
    kept: list[int] = []
    items: list[T] = []
    for i, path in enumerate(map(Path, paths)):
        try:
            items.append(load(path))
        except InputError as e:
            if skipped is None:
                raise
            log.warning("skipped: %s", e)
            skipped.append((path, str(e)))
            continue
        kept.append(i)
    return kept, items


def decode_value(value: bytes | bytearray | str, decode: Callable[[bytes], T], name: str = "image",
                 noun: str = "image") -> T:
    """Encoded file bytes, or the same as base64 (a string, or its ASCII bytes: MLflow's scoring server
    decodes base64 for `dataframe_split`/`dataframe_records` payloads but passes the text of `inputs` and
    `instances` through as bytes) -> decode(bytes). `name` starts the InputError's message."""
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"{name}: not valid base64 ({e})") from None
    if not isinstance(value, (bytes, bytearray)):
        raise InputError(f"{name}: expected {noun} bytes or a base64 string, got {type(value).__name__}")
    try:
        return decode(bytes(value))
    except BadSample as e:
        error = e
    try:
        decoded = base64.b64decode(bytes(value), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{name}: {error}") from None
    try:
        return decode(decoded)
    except BadSample as e:
        raise InputError(f"{name}: {e}") from None


def decode_image(value: bytes | bytearray | str, name: str = "image") -> Image.Image:
    """Image bytes or base64 (see decode_value) -> upright RGB."""
    return decode_value(value, lambda data: open_rgb(data)[0], name)


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


def model_slots(cfg: dict) -> dict[str, tuple[dict, str]]:
    """Where a checkpoint's config.json names the frozen models it loads: {models.<key>: (dict, field)}. An
    aligner's: its text encoder and the encoder of each modality it was trained on (vision, audio; a seed-era
    config names no modalities: image only); a projector's: its LLM."""
    if "text_model_name" not in cfg:
        return {"llm": (cfg, "model_name")}
    slots = {"text": (cfg, "text_model_name")}
    for m in cfg.get("modalities") or ["image"]:
        slots[MODALITIES[m].model_key] = ((cfg, "vision_model_name") if m == "image"
                                          else (cfg["encoders"][m], "model_name"))
    return slots


def _named(checkpoint: Path, key: str, models: Mapping[str, str | Path | None]) -> str:
    """The model `key` as given in `models`, else as the checkpoint's config.json names it."""
    holder, field = model_slots(read_json(checkpoint / "config.json"))[key]
    return str(models.get(key) or holder[field])


def _model_overrides(checkpoint: Path, models: Mapping[str, str | Path | None]) -> dict[str, Any]:
    """The checkpoint's config fields that name frozen models, each replaced by `models[key]` when given; in an
    export directory (export.py) models copied in are named relative to it: resolved."""
    cfg, root = read_json(checkpoint / "config.json"), export_root(checkpoint)
    for key, (holder, field) in model_slots(cfg).items():
        holder[field] = str(models[key]) if models.get(key) else resolve_model_name(holder[field], root)
    return {k: cfg[k] for k in ("vision_model_name", "text_model_name", "encoders", "model_name") if k in cfg}


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
    return load_captioner(aligner_dir, projector_dir, device=device, need=None)


def resolve_device(device: str = "auto") -> str:
    return get_device() if device == "auto" else device


def trained_modalities(aligner_dir: str | Path) -> list[str]:
    """The modalities an aligner checkpoint has adapters for, from its config.json (no weights load)."""
    d = _check_checkpoint(aligner_dir, "aligner", "--aligner")
    return read_json(d / "config.json").get("modalities") or ["image"]


def require_modality(aligner: VisionTextAligner, modality: str, checkpoint: str | Path) -> None:
    """InputError unless the aligner has an adapter for `modality` (it was trained with it on)."""
    if modality not in aligner.modalities:
        raise InputError(f"the aligner {checkpoint} was trained without {modality} (it has "
                         f"{' and '.join(aligner.modalities)} only): set `modalities.{modality}: true` in params.yaml "
                         "and run `dvc repro`")


def load_aligner(aligner_dir: str | Path, need: Sequence[str] | None = ("image",),
                 models: Mapping[str, str | Path | None] | None = None, device: str = "cpu",
                 dim: int | None = None) -> VisionTextAligner:
    """A Phase 1 checkpoint in eval mode, with the frozen encoders of `need` (modalities, or "text"; None: every
    modality it was trained on) loaded now, so a missing encoder or adapter fails here with a clear message.
    `models` ({"vision": dir, "audio": dir, ...}) overrides the model paths it was trained with; `dim`, if given,
    is checked against the checkpoint before any encoder loads."""
    d = _check_checkpoint(aligner_dir, "aligner", "--aligner")
    models = models or {}
    try:
        model = VisionTextAligner.from_pretrained(d, device=device, **_model_overrides(d, models)).eval()
        check_dim(model, dim)
    except ValueError as e:  # a config.json that no longer matches the code, or a corrupt checkpoint
        raise InputError(str(e)) from None
    for tower in model.modalities if need is None else need:
        key = "text" if tower == "text" else MODALITIES[tower].model_key
        if tower != "text":
            require_modality(model, tower, d)
        try:
            model.text_encoder if tower == "text" else model.encoder(tower)
        except ModelLoadError as e:
            raise _model_error(e, d, f"{key} encoder", _named(d, key, models)) from None
        except ValueError as e:  # an encoder that does not fit its config (e.g. its pooling)
            raise InputError(str(e)) from None
    return model


def load_captioner(aligner_dir: str | Path, projector_dir: str | Path,
                   models: Mapping[str, str | Path | None] | None = None, device: str = "cpu",
                   need: Sequence[str] | None = ("image",)) -> MultimodalLLM:
    """Aligner + projector checkpoints -> MultimodalLLM in eval mode, the encoders of `need` loaded (see
    load_aligner). The projector's config.json names the LLM (`model_name`); `models` ({"llm": dir,
    "vision": dir, "audio": dir}) overrides the model paths the checkpoints were trained with."""
    models = models or {}
    aligner = load_aligner(aligner_dir, need, models, device)
    d = _check_checkpoint(projector_dir, "projector", "--projector")
    try:
        mm = MultimodalLLM.from_pretrained(d, aligner, **_model_overrides(d, models))
    except ModelLoadError as e:
        raise _model_error(e, d, "LLM", _named(d, "llm", models)) from None
    return mm.to(device).eval()


def _none_read(paths: Sequence, skipped: list[tuple[Path, str]] | None, modality: str | None = "image"
               ) -> InputError:
    first = f": {skipped[0][1]}" if skipped else ""
    return InputError(f"none of the {len(paths)} {plural(modality)} could be read{first}")


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
def embed_files(aligner: VisionTextAligner, paths: Sequence[str | Path], modality: str = "image",
                dim: int | None = None, batch_size: int = 64, skipped: list[tuple[Path, str]] | None = None
                ) -> torch.Tensor:
    """Image or audio files (`modality`) -> unit-norm embeddings (N, dim), in the order given. `skipped`: see
    load_files (the rows of skipped files are left out)."""
    dim = check_dim(aligner, dim)
    load, out = loader(aligner, modality), []
    with batched(paths, batch_size, f"embedding {plural(modality)}", NOUNS[modality]) as chunks:
        for chunk in chunks:
            items = load_files(chunk, load, skipped)[1]
            if items:
                out.append(aligner.encode(modality, items).cpu())
    if not out:
        raise _none_read(paths, skipped, modality)
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
    """Image and audio files (told apart by extension: file_modality) -> one greedy caption each, in the order
    given. `prompt` None: the prompt the projector was trained with for the file's modality. `skipped`: see
    load_files (skipped files get no caption)."""
    captions: dict[int, str] = {}
    for modality in MODALITIES:
        rows = [i for i, p in enumerate(paths) if file_modality(p) == modality]
        if not rows:
            continue
        load = loader(mm.aligner, modality)
        with batched(rows, batch_size, f"captioning {plural(modality)}", NOUNS[modality]) as chunks:
            for chunk in chunks:
                read, items = load_files([paths[i] for i in chunk], load, skipped)
                if items:
                    out = mm.generate(items, prompt=prompt, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                      modality=modality)
                    captions.update(zip((chunk[j] for j in read), out))
    if not captions and paths:
        raise _none_read(paths, skipped, modality_of(paths))
    return [captions[i] for i in sorted(captions)]
