"""Hydra composition of conf/ exactly as `dvc exp run` does it (DVC's own compose_and_dump)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml


def compose(conf: Path, overrides: list[str] = ()) -> dict:
    """The params.yaml that `dvc exp run -S <overrides>` would write, as a dict."""
    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        compose_and_dump(out, str(conf.resolve()), None, "config", tmp, list(overrides))
        return yaml.safe_load(out.read_text())


def pin_overrides(conf: Path, extra: dict, name: str = "pinned") -> None:
    """Make every composition of `conf` (a test copy) end with `extra` on top: a config listed last in
    the defaults, so `dvc exp run -S key=value` keeps `extra` and changes only `key`."""
    (conf / f"{name}.yaml").write_text("# @package _global_\n" + yaml.safe_dump(extra, sort_keys=False))
    cfg = yaml.safe_load((conf / "config.yaml").read_text())
    cfg["defaults"].append(name)
    (conf / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
