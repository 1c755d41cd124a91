"""Run a stage or CLI command as a program: any error ends the output with one line that says what
is wrong and how to fix it; `MMALIGN_DEBUG=1` shows the full traceback instead.

Under `accelerate launch` each rank also writes its line to `$MMALIGN_ERROR_DIR/rank<N>.txt`, so the
launcher (stages/launch.py) can end its output with the same line instead of torch elastic's dump.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

# Error types whose message is already written for the user (names the key/path and the fix).
PLAIN = ("ValueError", "FileNotFoundError", "ModelLoadError", "InputError", "RuntimeError", "KeyError")


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if type(e).__name__ in PLAIN else f"{type(e).__name__}: {text}"


def debug() -> bool:
    """MMALIGN_DEBUG=1: show tracebacks instead of one-line errors."""
    return os.environ.get("MMALIGN_DEBUG", "").lower() in ("1", "true", "yes")


def report(message: str) -> None:
    """The one line a failed stage ends with (stderr), after a pointer to the traceback."""
    sys.stderr.flush()
    print(f"(MMALIGN_DEBUG=1 shows the traceback)\nERROR: {message}", file=sys.stderr)


def process_env() -> None:
    """Process-level settings, made by the entry points (stages, launcher, CLI) before torch loads, never
    on import of the library.

    OpenMP threads that spin while waiting stall badly when another process shares the cores (two
    queued experiments, a test run): measured on 2 cores, a small-matmul loop took 24.7 s vs 8.4 s
    with passive waiting, and 1.82 s vs 1.88 s on an idle machine.
    When stderr is not a terminal (DVC's piped output, CI), the Hugging Face libraries draw no progress
    bars (no carriage-return debris in logs); our own loops log plain lines (utils.LogProgress).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not sys.stderr.isatty():
        for var in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(var, "1")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def run_entry(command: Callable[..., Any], name: str, argv: list[str] | None = None) -> None:
    """`command`: a click command. Exits with its status, or 1 (error) / 130 (interrupted)."""
    process_env()
    try:
        command.main(argv, standalone_mode=False)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - every error becomes one line; MMALIGN_DEBUG=1 re-raises
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # click usage errors print themselves
            e.show()
            sys.exit(e.exit_code)
        if debug():
            raise
        message = f"{name} failed: {one_line(e)}"
        error_dir = os.environ.get("MMALIGN_ERROR_DIR")
        if error_dir:
            (Path(error_dir) / f"rank{os.environ.get('RANK', '0')}.txt").write_text(message + "\n")
        report(message)
        sys.exit(1)
    sys.exit(0)
