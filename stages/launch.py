"""`accelerate launch` for the training stages (dvc.yaml: `python stages/launch.py STAGE.py ARGS`).

Runs the stage through accelerate with configs/accelerate.yaml. A stage that fails ends the output
with its own one-line error (each rank writes it to MMALIGN_ERROR_DIR), not torch elastic's
multi-screen ChildFailedError dump; `MMALIGN_DEBUG=1` keeps the dump.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

CONFIG = "configs/accelerate.yaml"


def preflight(argv: list[str]) -> str | None:
    """The stage's own checks (params, model ids, data path) before accelerate and torch load: a bad
    id fails in about a second, not after every process has started. Returns the error line."""
    from mmalign.entry import debug, one_line
    from mmalign.params import load_params, preflight as check

    stage = Path(argv[0]).stem
    params = argv[argv.index("--params") + 1] if "--params" in argv[:-1] else "params.yaml"
    try:
        check(load_params(params), data=stage == "prepare")
    except Exception as e:  # noqa: BLE001 - reported as the stage's one line, as the stage itself would
        if debug():
            raise
        return f"{stage} failed: {one_line(e)}"
    return None


def processes() -> int:
    import yaml

    return int((yaml.safe_load(Path(CONFIG).read_text()) or {}).get("num_processes", 1))


def main(argv: list[str]) -> int:
    from mmalign.entry import debug, process_env, report

    process_env()  # inherited by every process accelerate starts
    error = preflight(argv)
    if error:
        report(error)
        return 1
    if processes() == 1:  # what accelerate's one-process launcher does, minus a second interpreter (~5 s of imports)
        import runpy

        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).resolve().parent.parent))  # as `python stages/x.py` from the root
        runpy.run_path(argv[0], run_name="__main__")  # the stage exits itself (run_entry), errors as one line
        return 0
    from accelerate.commands.launch import launch_command, launch_command_parser

    with tempfile.TemporaryDirectory(prefix="mmalign-errors-") as errors:
        os.environ["MMALIGN_ERROR_DIR"] = errors
        args = launch_command_parser().parse_args(["--config_file", CONFIG, "--quiet", *argv])
        try:
            launch_command(args)
        except (Exception, SystemExit) as e:  # ChildFailedError (N processes), CalledProcessError / exit (1)
            if isinstance(e, SystemExit) and not e.code:
                return 0
            lines = [p.read_text().strip() for p in sorted(Path(errors).glob("rank*.txt"))]
            if debug() or not lines:
                raise
            sys.stderr.flush()
            print(f"ERROR: {lines[0]}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
