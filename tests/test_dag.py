"""The DAG is a promise: each stage's deps are exactly the modules it imports, and each params key
re-runs exactly the stages whose results depend on it (DESIGN.md, "The DAG is a promise")."""

from __future__ import annotations

import ast
import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

SRC = ROOT / "src"
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]


def _module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Dotted names of every mmalign module `path` imports, at any depth of the file (lazy imports count)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import submodule`
    return {n for n in found if n.split(".")[0] == "mmalign" and _module_file(n)}


def import_closure(script: Path) -> set[Path]:
    """Files of src/mmalign that running `script` can import (packages' __init__ included)."""
    todo, seen = [(script, "__main__")], set()
    files: set[Path] = set()
    while todo:
        path, module = todo.pop()
        for name in _imports(path, module):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ first
                sub = ".".join(parts[:i])
                if sub not in seen and (f := _module_file(sub)):
                    seen.add(sub)
                    files.add(f)
                    todo.append((f, sub))
    return files


def stage_scripts(cmd: str) -> list[Path]:
    return [ROOT / w for w in cmd.split() if w.startswith("stages/") and w.endswith(".py")]


@pytest.mark.parametrize("stage", list(STAGES))
def test_deps_are_exactly_the_import_closure(stage):
    spec = STAGES[stage]
    closure = set().union(*[import_closure(s) for s in stage_scripts(spec["cmd"])])
    closure = {f.relative_to(ROOT).as_posix() for f in closure}
    deps = [d for d in spec["deps"] if d.startswith("src/")]
    covered = {f for f in closure if any(f == d or f.startswith(d + "/") for d in deps)}
    assert closure - covered == set(), f"stage {stage} imports modules its deps do not list"
    for dep in deps:
        files = {p.relative_to(ROOT).as_posix() for p in (ROOT / dep).rglob("*.py")} if (ROOT / dep).is_dir() else {dep}
        assert files <= closure, f"stage {stage} lists {dep}, but does not import {sorted(files - closure)}"
    scripts = {s.relative_to(ROOT).as_posix() for s in stage_scripts(spec["cmd"])}
    assert scripts <= set(spec["deps"]), f"stage {stage} must depend on its own scripts"


# Which stages a change of each params.yaml key re-runs directly (downstream stages follow through
# their deps). Keys not listed here must re-run nothing (operational keys), and every leaf key of
# params.yaml must be covered by a prefix here or in OPERATIONAL, so a new key forces a decision.
INVALIDATES = {
    # a modality's switch re-runs its own prepare and everything that trains or scores on the set of modalities
    "modalities.image": {"prepare", "llm", "align", "project", "evaluate"},
    "modalities.audio": {"prepare_audio", "llm", "align", "project", "evaluate"},
    "models.vision": {"prepare"}, "models.audio": {"prepare_audio"}, "models.text": {"prepare", "prepare_audio"},
    "models.llm": {"llm"}, "models.trust_remote_code": {"prepare", "prepare_audio", "project"},
    "prepare.tiny_llm": {"llm"},
    "prepare.feature_dtype": {"prepare", "prepare_audio"},  # both caches are stored in it
    "prepare.mixed_precision": {"prepare", "prepare_audio"},  # both caches are extracted in it
    "prepare": {"prepare"},  # every other image prepare key (data, synthetic recipe, vision pooling, tiny_clip)
    "prepare.audio": {"prepare_audio"},  # every audio key: never the image extraction, and the reverse
    "align": {"align"}, "project": {"project"}, "evaluate": {"evaluate"},
}
OPERATIONAL = {"prepare.batch_size", "prepare.num_workers", "prepare.audio.batch_size", "align.resume",
               "align.state_every", "project.resume", "project.state_every", "project.watch_images", "tracking"}


def leaf_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def expected(key: str) -> set[str]:
    if any(key == p or key.startswith(p + ".") for p in OPERATIONAL):
        return set()
    best = max((p for p in INVALIDATES if key == p or key.startswith(p + ".")), key=len)
    return INVALIDATES[best]


@pytest.fixture(scope="module")
def locked_repo(tmp_path_factory) -> Path:
    """A copy of the repo whose dvc.lock records every stage as done (dummy outs, `dvc commit`): no stage runs."""
    repo = tmp_path_factory.mktemp("dag")
    for f in ["dvc.yaml", "params.yaml", "configs/accelerate.yaml", ".dvc/config"] + [
            d for s in STAGES.values() for d in s["deps"] if (ROOT / d).exists()]:
        src = ROOT / f
        if src.is_dir():
            shutil.copytree(src, repo / f, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / f)
    for spec in STAGES.values():
        for out in [*spec.get("outs", []), *spec.get("metrics", []), *spec.get("plots", [])]:
            name = next(iter(out)) if isinstance(out, dict) else out
            path = repo / name
            if Path(name).suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("x,y\n1,2\n" if name.endswith(".csv") else "{}\n")
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "f").write_text(name)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    from dvc.repo import Repo

    with contextlib.chdir(repo), Repo(str(repo)) as dvc:
        dvc.commit(None, force=True)
        assert dvc.status() == {}
    return repo


def test_every_params_key_reruns_exactly_the_stages_that_depend_on_it(locked_repo):
    from dvc.repo import Repo

    params_file = locked_repo / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    wrong = {}
    try:
        for key in leaf_keys(params):
            flipped = yaml.safe_load(original)
            node = flipped
            *parents, last = key.split(".")
            for p in parents:
                node = node[p]
            node[last] = [node[last], "flipped"] if isinstance(node[last], list) else f"{node[last]}-flipped"
            params_file.write_text(yaml.safe_dump(flipped, sort_keys=False))
            with contextlib.chdir(locked_repo), Repo(str(locked_repo)) as dvc:
                changed = set(dvc.status())
            if changed != expected(key):
                wrong[key] = (sorted(changed), sorted(expected(key)))
    finally:
        params_file.write_text(original)
    assert not wrong, f"keys that re-run the wrong stages (got, expected): {wrong}"


def test_accelerate_port_reruns_nothing_but_process_count_reruns_training(locked_repo):
    from dvc.repo import Repo

    cfg_file = locked_repo / "configs/accelerate.yaml"
    original = cfg_file.read_text()
    try:
        for key, value, stages in (("main_process_port", 29501, set()), ("num_processes", 2, {"align", "project"})):
            cfg = yaml.safe_load(original)
            cfg[key] = value
            cfg_file.write_text(yaml.safe_dump(cfg))
            with contextlib.chdir(locked_repo), Repo(str(locked_repo)) as dvc:
                assert set(dvc.status()) == stages, key
    finally:
        cfg_file.write_text(original)
