"""End to end: `dvc repro` in a temporary copy of the repo, on tiny params."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY_PARAMS, deep_update
from helpers.presets import compose, pin_overrides

pytestmark = pytest.mark.slow
DVC = [sys.executable, "-m", "dvc"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    # dvc.yaml calls `python`: make it this interpreter (the README activates the venv for the same reason).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env


def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run `cmd`; its stdout + stderr as written (bytes decoded, so a carriage return stays one)."""
    out = subprocess.run(cmd, cwd=cwd, env={**_env(), **(env or {})}, capture_output=True, timeout=900)
    stdout, stderr = out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace")
    assert out.returncode == 0, f"{cmd} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout + stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    params = deep_update(yaml.safe_load((dst / "params.yaml").read_text()), TINY_PARAMS)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # `dvc exp run` re-composes params.yaml from conf/ (Hydra): pin the tiny sizes there too.
    pin_overrides(dst / "conf", TINY_PARAMS)
    assert compose(dst / "conf") == params
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        sh(cmd, dst)
    return dst


def leaves(d: dict, prefix: str = "") -> set[str]:
    return set().union(*[leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
                         for k, v in d.items()])


def find_x(spec: dict) -> dict:
    """The x encoding of a (layered) vega-lite spec."""
    for layer in spec.get("layer", []) + spec.get("spec", {}).get("layer", []):
        if "x" in layer.get("encoding", {}):
            return layer["encoding"]["x"]
        found = find_x(layer)
        if found:
            return found
    return {}


def stages_run(log: str) -> list[str]:
    return [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")]


def test_dvc_repro_end_to_end(repo):
    log = sh([*DVC, "repro"], repo)
    assert sorted(stages_run(log)) == ["align", "evaluate", "llm", "prepare", "prepare_audio", "project"]
    assert "\r" not in log and "\x1b[" not in log  # piped: plain lines, no progress-bar debris or ANSI codes
    assert stages_run(log)[0] == "prepare" and stages_run(log)[-1] == "evaluate"
    headline = json.loads((repo / "eval/metrics.json").read_text())
    assert len(leaves(headline)) <= 16 and {"i2t_R1", "CIDEr", "blind_CIDEr"} <= set(headline)
    every = json.loads((repo / "eval/metrics_all.json").read_text())
    assert all({"retrieval", "captioning"} <= set(every[m]) for m in ("image", "audio"))
    assert (repo / "mlflow.db").exists() and any((repo / "mlartifacts").rglob("*.png"))

    # Nothing changed: nothing runs.
    assert stages_run(sh([*DVC, "repro"], repo)) == []
    shown = json.loads(sh([*DVC, "metrics", "show", "--json"], repo))
    assert set(shown[""]["data"]) == {"eval/metrics.json"}  # the headline only; the full set on request:
    assert "retrieval" in sh([*DVC, "metrics", "show", "eval/metrics_all.json", "--json"], repo)
    # Each plot once (the top-level definitions), each x a real column: no panel over a row index.
    panels = json.loads(sh([*DVC, "plots", "show", "--json"], repo))["data"]
    declared = {name: spec["x"] for entry in yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
                for name, spec in entry.items()}
    assert set(panels) == set(declared)
    for name, (panel,) in panels.items():
        x = panel["content"]["encoding"]["x"] if "encoding" in panel["content"] else find_x(panel["content"])
        assert x["field"] == declared[name] and x["title"], name

    # DVC's workflow: commit the results (dvc.lock, the metrics, DVC's .gitignore files); the experiments
    # below compare against this baseline.
    sh(["git", "add", "-A"], repo)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline results"], repo)
    # An align param re-runs align and what consumes its checkpoint, never prepare.
    sh([*DVC, "exp", "run", "-S", "align.lr=0.002", "--name", "lr-test"], repo)
    out = sh([*DVC, "exp", "show", "--json"], repo)
    assert "lr-test" in out
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["mmalign"], output_format="list")
    tagged = {r.data.tags.get("mmalign.stage") for r in runs if r.data.tags.get("dvc.exp_name") == "lr-test"}
    tagged.discard(None)  # the parent run of the pipeline execution
    assert tagged == {"align", "project", "evaluate"}

    # Two experiments side by side fit a 200-column terminal (the table measured unwrapped).
    sh([*DVC, "exp", "run", "-S", "align.lr=0.0025", "--name", "lr-test2"], repo)  # (the queue test uses 0.003)
    table = sh([*DVC, "exp", "show", "--only-changed", "--no-pager"], repo, env={"COLUMNS": "1000"})
    assert "lr-test2" in table and "align.lr" in table, table
    assert max(len(line.rstrip()) for line in table.splitlines()) <= 200, table


def _lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def test_changing_the_llm_extracts_no_feature(repo, tiny_llm_dir):
    """`-S models.llm=<another local LLM>` re-runs llm, project and evaluate; the feature cache is untouched."""
    features = [o for o in _lock(repo)["prepare"]["outs"] if o["path"] == "data/features"]
    log = sh([*DVC, "exp", "run", "-S", f"models.llm={tiny_llm_dir}", "--name", "other-llm"], repo)
    assert stages_run(log) == ["llm", "project", "evaluate"]
    assert "extract" not in log.lower()
    assert [o for o in _lock(repo)["prepare"]["outs"] if o["path"] == "data/features"] == features
    assert yaml.safe_load((repo / "models/llm/models.json").read_text()) == {"llm": str(tiny_llm_dir)}
    sh(["git", "checkout", "params.yaml"], repo)


@pytest.mark.parametrize("key", ["models.llm", "models.vision"])  # llm first: a failed stage loses its outs
def test_a_bad_model_id_fails_dvc_repro_in_seconds(repo, key):
    start = time.monotonic()
    out = subprocess.run([*DVC, "exp", "run", "-S", f"{key}=nonexistent-org/nonexistent-model-xyz"], cwd=repo,
                         env=_env(), capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    sh(["git", "checkout", "params.yaml"], repo)
    sh([*DVC, "checkout"], repo)  # DVC removed the failed stage's outs before running it: restore them
    assert out.returncode != 0
    assert f"ERROR: {'prepare' if key == 'models.vision' else 'llm'} failed: {key}='nonexistent-org/" \
           f"nonexistent-model-xyz'" in out.stderr, out.stderr[-2000:]
    assert took < 20, took


def readme_commands() -> list[str]:
    """The short commands of README's bash blocks, as written: `dvc` inspection and `mmalign`. Left out:
    set-up lines, servers (`mlflow ui`, `mlflow models serve`, `curl`), `dvc exp run` / `dvc queue` (the
    tests above run experiments), and lines with a <placeholder>."""
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```bash\n")[1:]]
    lines = [line.split("  #")[0].strip() for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    keep = ("dvc metrics", "dvc plots", "dvc exp show", "dvc status", "mmalign ")
    return [line for line in lines if line.startswith(keep) and "<" not in line]


def test_readme_commands_run_as_written(repo):
    from PIL import Image

    commands = readme_commands()
    assert len(commands) >= 12 and "mmalign register" in commands, commands
    import numpy as np
    import soundfile as sf

    for name in ("img1.png", "img2.jpg", "img.png", "photos/a.png", "photos/b.png"):
        (repo / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (32, 32), "red").save(repo / name)
    t = np.arange(16000) / 16000
    for i, name in enumerate(("clip.wav", "sounds/a.wav", "sounds/b.flac")):
        (repo / name).parent.mkdir(exist_ok=True)
        sf.write(repo / name, (0.3 * np.sin(2 * np.pi * 440 * (i + 1) * t)).astype(np.float32), 16000)
    for command in commands:
        out = subprocess.run(command, shell=True, cwd=repo, env=_env(), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"README command failed: {command}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"


def test_dvc_repro_with_two_processes(repo):
    """`accelerate launch` with 2 processes (DDP over gloo) for align and project, same metric keys."""
    import mlflow

    before = json.loads((repo / "eval/metrics.json").read_text())
    log = sh([*DVC, "exp", "run", "-S", "configs/accelerate.yaml:num_processes=2", "--name", "ddp2"], repo)
    assert stages_run(log) == ["align", "project", "evaluate"]
    after = json.loads((repo / "eval/metrics.json").read_text())  # the experiment's results, in the workspace

    assert leaves(after) == leaves(before)
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = [r for r in mlflow.search_runs(experiment_names=["mmalign"], output_format="list")
            if r.data.tags.get("dvc.exp_name") == "ddp2" and "mmalign.stage" in r.data.tags]
    assert {r.data.tags["mmalign.stage"]: r.data.tags["mmalign.num_processes"] for r in runs} == {
        "align": "2", "project": "2", "evaluate": "1"}  # one run per stage: only rank 0 tracks
    assert all(r.info.status == "FINISHED" for r in runs)
    sh(["git", "checkout", "configs/accelerate.yaml"], repo)


def test_queued_experiments_in_parallel_lose_no_run(repo):
    """2 queued experiments, run side by side, and a --temp one meanwhile, all log complete runs into the workspace's one mlflow.db;
    DVC compares their metrics and plots."""
    import mlflow

    names = [f"q{i}" for i in range(2)]
    for i, name in enumerate(names):
        sh([*DVC, "exp", "run", "--queue", "--name", name, "-S", f"align.lr={0.001 * (i + 3)}"], repo)
    # `dvc queue start` spawns worker daemons and, once seen here, did not return: start it without
    # waiting on it (or its pipes) and poll `dvc queue status` instead.
    starter = subprocess.Popen([*DVC, "queue", "start", "-j", "2"], cwd=repo, env=_env(), stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sh([*DVC, "exp", "run", "--temp", "--name", "tmp-run", "-S", "align.lr=0.0077"], repo)  # runs meanwhile
    names.append("tmp-run")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = sh([*DVC, "queue", "status"], repo)
        if not any(word in status for word in ("Queued", "Running")):
            break
        time.sleep(3)
    subprocess.run([*DVC, "queue", "stop", "--kill"], cwd=repo, env=_env(), capture_output=True, timeout=60)
    if starter.poll() is None:
        os.killpg(starter.pid, signal.SIGKILL)
    assert "Failed" not in status and time.monotonic() < deadline, status
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["mmalign"], output_format="list")
    done = {r.data.tags.get("dvc.exp_name") for r in runs
            if r.data.tags.get("mmalign.stage") == "evaluate" and r.info.status == "FINISHED"
            and "image.retrieval.i2t.R1" in r.data.metrics and "i2t_R1" in r.data.metrics}
    assert set(names) <= done

    # The experiment commits carry the metrics and plots: DVC shows and diffs them.
    shown = json.loads(sh([*DVC, "exp", "show", "--json"], repo))
    exps = {e["name"]: e for row in shown for e in [row, *[x for ex in row.get("experiments") or []
                                                         for x in ex.get("revs", [])]] if e.get("name")}
    for name in names[:2]:
        metrics = exps[name]["data"]["metrics"]["eval/metrics.json"]["data"]
        assert metrics["i2t_R1"] >= 0, name
    diff = json.loads(sh([*DVC, "metrics", "diff", names[0], names[1], "--all", "--json"], repo))
    assert "i2t_R1" in diff["eval/metrics.json"]
    plots = sh([*DVC, "plots", "diff", names[0], names[1], "--json"], repo)
    assert "recall_by_dim" in plots and "align_loss" in plots

