"""Shared by the benchmark scripts: the default params, the tiny CLIP, a timer and the result rows.

Benchmarks print (they are scripts, not library code); ratios are measured side by side in one
process so that another job on the machine slows both sides alike.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runnable without the editable install too


from mmalign.params import load_params  # noqa: E402

logging.getLogger("mmalign").setLevel(logging.WARNING)


def default_params() -> dict[str, Any]:
    return load_params(ROOT / "params.yaml")


def build_default_clip(out_dir: Path) -> Path:
    """The default `builtin:tiny-clip` (TinyCLIPConfig() at the default image size)."""
    from mmalign.config import TinyCLIPConfig
    from mmalign.standins.tiny_clip import build_tiny_clip

    return build_tiny_clip(out_dir / "tiny-clip", TinyCLIPConfig(), default_params()["prepare"]["image_size"])


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of fn()."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@dataclasses.dataclass
class Row:
    """One line of the results table: B measured against A, ratio = b / a (or as `ratio` says)."""

    name: str
    a_label: str
    a: float
    b_label: str
    b: float
    unit: str
    target: float | None  # minimum ratio (maximum with at_most); None: no target (reported only)
    ratio: float | None = None
    note: str = ""
    at_most: bool = False  # the target is a ceiling (memory), not a floor

    def __post_init__(self) -> None:
        if self.ratio is None and self.a and self.target is not None:  # no target: times, not a ratio
            self.ratio = self.b / self.a

    @property
    def met(self) -> str:
        if self.target is None or self.ratio is None:
            return "n/a"
        return "yes" if (self.ratio <= self.target if self.at_most else self.ratio >= self.target) else "NO"


def print_rows(rows: list[Row]) -> None:
    print(format_table(rows))


def format_table(rows: list[Row]) -> str:
    head = ["benchmark", "A", "B", "ratio B/A", "target", "met?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        target = "-" if r.target is None else f"{'<=' if r.at_most else '>='} {r.target:g}"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(f"| {r.name} | {r.a_label}: {r.a:,.1f} {r.unit} | {r.b_label}: {r.b:,.1f} {r.unit} | "
                     f"{ratio} | {target} | {r.met} |")
    return "\n".join(lines)
