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

    OpenMP threads wait for the next parallel region by spinning a bounded number of times, then sleep
    (GOMP_SPINCOUNT=3000, torch's libgomp). Spinning without bound (libgomp's default) stalls badly when
    another process shares the cores; sleeping at once (OMP_WAIT_POLICY=PASSIVE) pays a wake-up for every
    small op. benchmarks/bench_omp_wait.py, 2 cores, 60 steps of the stand-in LLM's pretraining:
    alone 12.0 s (unbounded) / 12.5 s (3000) / 15.7 s (passive); two at once 57.6 / 20.6 / 16.2 s; the
    llm stage of the default: 58 s (3000) vs 83 s (passive). An OMP_WAIT_POLICY or GOMP_SPINCOUNT already
    set wins (the test suite sets PASSIVE: it runs two workers).
    When stderr is not a terminal (DVC's piped output, CI), the Hugging Face libraries draw no progress
    bars (no carriage-return debris in logs); our own loops log plain lines (utils.LogProgress).
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "3000")
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
