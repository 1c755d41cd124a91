"""Benchmark 5: wall time of `dvc repro` of the default from scratch, then of a no-op `dvc repro`.

Clones the repo (committed state) into a temp dir and runs there, so the workspace is untouched.
Takes ~5-7 minutes on a 2-core CPU (image and audio; the VM's speed drifts, README). No ratio target: both times are reported.

    python benchmarks/bench_repro.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, Row, print_rows, timed

# Measured with this script's steps on the project's 2-core build machine (README), used by run_all
# unless --with-repro is given.
LAST = {"scratch_s": 280.0, "noop_s": 1.4, "date": "2026-11-29"}  # 329.7 s twenty minutes earlier (README)


def run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "mmalign"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "PYTHONPATH": str(clone / "src")}
        repro = lambda: subprocess.run(["dvc", "repro"], cwd=clone, env=env, check=True,  # noqa: E731
                                       stdout=subprocess.DEVNULL)
        scratch, _ = timed(repro)
        noop, _ = timed(repro)
    return {"rows": [Row("5. dvc repro", "from scratch", scratch, "no-op", noop, "s", None, ratio=None,
                         note=f"measured now: from scratch {scratch:.0f} s, no-op {noop:.1f} s")]}


def last_measured() -> dict:
    return {"rows": [Row("5. dvc repro (not re-run)", "from scratch", LAST["scratch_s"], "no-op", LAST["noop_s"], "s",
                         None, note=f"not run now (pass --with-repro); measured {LAST['date']} on this machine: "
                         f"from scratch {LAST['scratch_s']:.0f} s, no-op {LAST['noop_s']:.1f} s")]}


if __name__ == "__main__":
    res = run()
    print_rows(res["rows"])
    print(res["rows"][0].note)
