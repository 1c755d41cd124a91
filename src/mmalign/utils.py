"""Small shared helpers: device/seed, atomic file writes, safetensors checkpoints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import config

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"  # beside model.safetensors: {"model.safetensors": sha256 hex}
DTYPES = {name: getattr(torch, name) for name in config.DTYPES}  # "bfloat16" -> torch.bfloat16


class LogProgress:
    """What `progress` is when stderr is not a terminal (DVC's piped output, CI logs): no bar and no
    carriage returns, but a log line at most every `every` seconds (and one when a long loop ends), so
    a piped log says what runs and how far it is, in plain lines. Takes tqdm's arguments it needs."""

    def __init__(self, iterable: Any = None, desc: str = "", total: int | None = None, unit: str = "it",
                 disable: bool = False, every: float = 15.0, **_: Any):
        self.iterable, self.desc, self.unit, self.disable, self.every = iterable, desc, unit, disable, every
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix, self.logged = 0, "", False
        self.start = self.last = time.monotonic()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self.last >= self.every:
            self.last, self.logged = now, True
            self._log()

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        if self.logged:  # a loop that said it was running also says it finished
            self.logged = False
            self._log()

    def _log(self) -> None:
        of = f"/{self.total}" if self.total else ""
        log.info("%s: %d%s %s, %.0f s%s", self.desc, self.n, of, self.unit, time.monotonic() - self.start,
                 f" ({self.postfix})" if self.postfix else "")


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar on a terminal; LogProgress lines when stderr is piped (DVC, CI)."""
    if not sys.stderr.isatty():
        return LogProgress(iterable, **kwargs)
    return tqdm(iterable, **kwargs)


def prefetch(iterable: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate `iterable` in a background thread, up to `depth` items ahead, in order.

    Image decoding and resizing (PIL) release the GIL, so the next batch is read and preprocessed
    while torch runs the current one. An exception in the thread is raised here.
    """
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in iterable:
                if stop.is_set():
                    return
                q.put((True, item))
            q.put((False, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            q.put((False, e))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                if item is not None:
                    raise item
                return
            yield item
    finally:  # the consumer stopped early or failed: let the thread finish its last put and exit
        stop.set()
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                q.get_nowait()
            thread.join(0.01)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`module` in eval mode inside the block (no dropout); its own training flag is restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def get_device() -> str:
    """The best available device: cuda (this process's GPU under `accelerate launch`), then mps, then cpu."""
    if torch.cuda.is_available():
        return f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it replaces `path` in one rename.

    Works for files and directories. On error the temporary is removed and `path` is untouched,
    so a killed or failed run never leaves a half-written output behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        old = tmp / ".old"
        if path.exists() or path.is_symlink():
            os.replace(path, old)  # os.replace cannot overwrite a non-empty directory: move it aside first
        try:
            os.replace(target, path)
        except BaseException:
            if old.exists() or old.is_symlink():
                os.replace(old, path)  # put the previous output back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first (dvc repro)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and re-run the stage that writes it") from None


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write `model.safetensors` + `config.json` + `checksums.json` (the weights' sha256) into
    `directory`, atomically (whole dir at once). config.json stays the plain model config."""
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        sums = {"model.safetensors": _file_sha256(tmp / "model.safetensors")}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2) + "\n")


def verify_checkpoint(directory: str | Path) -> None:
    """Raise ValueError if model.safetensors no longer has the sha256 recorded in checksums.json.

    Damage in the tensor data (e.g. a block overwritten in place, same size) loads without any
    error from safetensors and yields garbage weights, so the bytes are checked before loading.
    A checkpoint written before checksums existed loads with a warning.
    """
    directory = Path(directory)
    weights, sums_path = directory / "model.safetensors", directory / CHECKSUMS
    fix = f"delete {directory} and re-run the stage that writes it"
    if not sums_path.exists():
        log.warning("checkpoint %s has no %s (written by an older mmalign): loading it unverified; "
                    "%s to add one", directory, CHECKSUMS, fix)
        return
    expected = read_json(sums_path)
    if not isinstance(expected, dict) or not isinstance(expected.get("model.safetensors"), str):
        raise ValueError(f"{sums_path} has no sha256 for model.safetensors; {fix}")
    if _file_sha256(weights) != expected["model.safetensors"]:
        raise ValueError(f"checkpoint {weights} is damaged (its sha256 differs from {sums_path}); {fix}")


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`, verified first (safetensors: nothing is unpickled)."""
    directory = Path(directory)
    weights = directory / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"no checkpoint at {directory} (missing model.safetensors): run the stage that trains it")
    verify_checkpoint(directory)
    try:
        tensors = load_file(weights)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise ValueError(f"checkpoint {weights} is corrupt ({e}); delete {directory} and re-run the stage "
                         "that writes it") from None
    return tensors, read_json(directory / "config.json")
