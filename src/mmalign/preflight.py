"""Fail first: every model id and data path the pipeline will need, checked in seconds before a stage
does any work (a bad `models.llm` must not wait for features to be extracted, at real scale hours).

A model is fine when it is a `builtin:` stand-in, a local directory with a config.json and safetensors
weights, a hub id already in the local Hugging Face cache, or a hub id the hub knows (one quick probe;
offline, an id that is not cached fails at once). Nothing is downloaded or loaded here.
"""

from __future__ import annotations

from pathlib import Path

from .config import ModelsConfig, PrepareConfig
from .hub import hub_unreachable, offline_flag, resolve_text_model

KINDS = {"vision": "vision encoder", "audio": "audio encoder", "text": "text encoder", "llm": "LLM"}
PROBE_TIMEOUT_S = 5.0


def _local_model_problem(path: Path) -> str | None:
    """Why a local directory cannot be loaded as a model, or None."""
    if not path.is_dir():
        return "is a file, not a model directory"
    weights = [*path.glob("*.safetensors"), *path.glob("*/*.safetensors")]  # sentence-transformers: in a module dir
    if not weights:
        pickled = [p.name for p in (*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth"))]
        if pickled:
            return (f"has only pickle weights ({', '.join(sorted(pickled)[:3])}) and mmalign loads safetensors only. "
                    "Fix: re-save it with save_pretrained(dir, safe_serialization=True)")
        return "has no *.safetensors weights. Fix: point it at a model saved with save_pretrained"
    if not (path / "config.json").exists() and not (path / "modules.json").exists():
        return "has no config.json. Fix: point it at a model saved with save_pretrained"
    return None


def _hub_problem(name: str) -> str | None:
    """Why a hub id cannot be used (not cached, hub unreachable or id unknown), or None."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", "modules.json"):
        if isinstance(try_to_load_from_cache(name, filename), str):
            return None  # in the local cache
    if hub_unreachable():
        where = "HF_HUB_OFFLINE is set" if offline_flag() else "the hub is unreachable"
        return (f"is not a local path and not in the Hugging Face cache ({where}). Fix: `hf download {name}` where "
                "the hub is reachable, point HF_HOME at a cache that has it, or give a local directory")
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        info = model_info(name, timeout=PROBE_TIMEOUT_S)
    except GatedRepoError:
        return "is a gated model. Fix: accept its licence on the hub and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        return "does not exist on the Hugging Face Hub. Fix: check the id, or give a local directory"
    except Exception:  # noqa: BLE001 - a flaky probe must not stop a run; the real load reports errors
        return None
    if info.siblings is not None and not any(s.rfilename.endswith(".safetensors") for s in info.siblings):
        return "has no safetensors weights on the hub (mmalign never unpickles weights). Fix: pick a safetensors model"
    return None


def model_problem(name: str) -> str | None:
    if name.startswith("builtin:"):
        return None
    path = Path(resolve_text_model(name)).expanduser()
    if path.exists():
        return _local_model_problem(path)
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:  # a hub id is `name` or `org/name`
        return "is no such directory. Fix: check the path (relative paths start at the repo root), or give a hub id"
    return _hub_problem(name)


def check_models(models: ModelsConfig, keys: tuple[str, ...] = ("vision", "text", "llm")) -> None:
    """Raise one ValueError naming the first unusable `models.<key>` and the fix."""
    for key in keys:
        name = getattr(models, key)
        problem = model_problem(name)
        if problem:
            raise ValueError(f"models.{key}='{name}' ({KINDS[key]}) {problem}")


def check_data(cfg: PrepareConfig, modalities: list[str] | tuple[str, ...] = ("image",)) -> None:
    """Each enabled modality's data source exists (for `hf`, a hub id that can be reached or is cached)."""
    if "audio" in modalities:
        a = cfg.audio
        if a.source == "audiofolder" and not Path(a.audiofolder.path).expanduser().is_dir():
            raise ValueError(f"prepare.audio.audiofolder.path='{a.audiofolder.path}' is not a directory. Fix: point it "
                             "at a folder of audio files with metadata.jsonl or metadata.csv")
        if a.source == "hf":
            check_hf_path(a.hf.path, "prepare.audio.hf.path")
    if "image" not in modalities:
        return
    if cfg.source == "imagefolder":
        path = Path(cfg.imagefolder.path).expanduser()
        if not path.is_dir():
            raise ValueError(f"prepare.imagefolder.path='{cfg.imagefolder.path}' is not a directory. Fix: point it at a "
                             "folder of images with metadata.jsonl or metadata.csv")
    elif cfg.source == "webdataset":
        from .data.webdataset import shard_paths

        shard_paths(cfg.webdataset.path)  # raises naming the pattern when it matches no shard
    elif cfg.source == "hf":
        check_hf_path(cfg.hf.path, "prepare.hf.path")


def check_hf_path(value: str, key: str) -> None:
    """A `datasets` source: a local path, or a hub id that the hub or the datasets cache can serve."""
    path = Path(value).expanduser()
    if path.exists() or not hub_unreachable():
        return
    import datasets

    cached = Path(datasets.config.HF_DATASETS_CACHE) / value.replace("/", "___")
    if not cached.exists():
        raise ValueError(
            f"{key}='{value}' is not a local path and not in the datasets cache, and "
            f"{'HF_HUB_OFFLINE is set' if offline_flag() else 'the hub is unreachable'}. Fix: load it once where "
            "the hub is reachable, point HF_HOME at a cache that has it, or give a save_to_disk directory or "
            "parquet files")
