"""Interrupted training resumes from its saved state and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_stages
from conftest import STAGE_ARGS as ARGS
from mmalign.models.aligner import VisionTextAligner
from mmalign.config import AlignmentConfig
from mmalign.data.dataset import FeaturePairBatches
from mmalign.training.train import train_alignment


def _model_and_loader(seed: int = 0):
    g = torch.Generator().manual_seed(0)  # the data never changes; `seed` only changes the init
    v, t = torch.randn(64, 12, generator=g), torch.randn(64, 10, generator=g)
    torch.manual_seed(seed)
    cfg = AlignmentConfig(vision_dim=12, text_dim=10, d_align=8, hidden_dim=16, mrl_dims=[4, 8], batch_size=16,
                          num_epochs=3, dropout=0.2, lr=1e-2)
    model = VisionTextAligner(cfg)
    return model, FeaturePairBatches(v, t, torch.arange(64), 16, seed=1)


class Killed(Exception):
    pass


def test_fit_resumes_to_the_same_weights(tmp_path):
    model, loader = _model_and_loader()
    ref = train_alignment(model, loader, progress=False)
    expected = {k: v.clone() for k, v in model.trainable_state_dict().items()}

    def die_at_step_7(row, step):
        if step == 7:
            raise Killed

    model, loader = _model_and_loader()
    with pytest.raises(Killed):
        train_alignment(model, loader, progress=False, state_dir=tmp_path / "state", state_every=3,
                        fingerprint="x", on_log=die_at_step_7)
    assert (tmp_path / "state/state.json").exists()  # last snapshot: step 6

    model, loader = _model_and_loader(seed=123)  # other init: everything must come from the state
    resumed = train_alignment(model, loader, progress=False, state_dir=tmp_path / "state", state_every=3,
                              fingerprint="x")
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert [s["train/loss"] for s in resumed["steps"]] == [s["train/loss"] for s in ref["steps"]]
    assert not (tmp_path / "state").exists()  # a finished run leaves no state behind


def test_state_for_other_params_is_not_resumed(tmp_path):
    model, loader = _model_and_loader()
    with pytest.raises(Killed):
        train_alignment(model, loader, progress=False, state_dir=tmp_path / "s", state_every=2, fingerprint="a",
                        on_log=lambda row, step: (_ for _ in ()).throw(Killed) if step == 5 else None)
    model, loader = _model_and_loader()
    hist = train_alignment(model, loader, progress=False, state_dir=tmp_path / "s", fingerprint="b")
    assert hist["steps"][0]["step"] == 1  # started from scratch


def _stage_cmd(stage: str, params, extra: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "stages" / f"{stage}.py"), "--params", str(params), *extra]


def _run_killed_then_resumed(stage, params, args, state, env, cwd):
    """Start the stage, SIGKILL it once it has written a training state, then run it again to the end."""
    proc = subprocess.Popen(_stage_cmd(stage, params, args + ["--state", state]), cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (cwd / state / "state.json").exists():
        assert proc.poll() is None, f"{stage} ended before writing a state:\n{proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    out = subprocess.run(_stage_cmd(stage, params, args + ["--state", state]), cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in out.stderr


@pytest.mark.slow
def test_align_and_project_killed_with_sigkill_resume(tmp_path, tiny_params_file, mlflow_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = tiny_params_file.read_text()
    text = text.replace("num_epochs: 2", "num_epochs: 12").replace("state_every: 50", "state_every: 4")
    tiny_params_file.write_text(text.replace("num_epochs: 1\n", "num_epochs: 4\n"))
    run_stages(tiny_params_file, "prepare", "prepare_audio", "llm")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}

    def args(stage: str, out: str, plots: str) -> list[str]:
        a = list(ARGS[stage])
        a[a.index("--out") + 1], a[a.index("--plots") + 1] = out, plots
        return a

    # Uninterrupted reference runs.
    subprocess.run(_stage_cmd("align", tiny_params_file, args("align", "ref/align", "ref/plots/align")),
                   cwd=tmp_path, env=env, check=True, capture_output=True)
    # Killed + resumed runs (project trains on the same reference aligner).
    _run_killed_then_resumed("align", tiny_params_file, args("align", "models/aligner", "plots/align"),
                             "state/align", env, tmp_path)
    project_args = args("project", "models/projector", "plots/project")
    project_args[project_args.index("--aligner") + 1] = "ref/align"
    ref_project = args("project", "ref/project", "ref/plots/project")
    ref_project[ref_project.index("--aligner") + 1] = "ref/align"
    subprocess.run(_stage_cmd("project", tiny_params_file, ref_project), cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    _run_killed_then_resumed("project", tiny_params_file, project_args, "state/project", env, tmp_path)

    for stage, out in (("align", "models/aligner"), ("project", "models/projector")):
        a, b = load_file(tmp_path / out / "model.safetensors"), load_file(tmp_path / f"ref/{stage}/model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
        got = pd.read_csv(tmp_path / f"plots/{stage}/val.csv")
        ref = pd.read_csv(tmp_path / f"ref/plots/{stage}/val.csv")
        pd.testing.assert_frame_equal(got, ref)
        assert not (tmp_path / f"state/{stage}").exists()


def test_nan_loss_stops_with_step_and_keeps_best_checkpoint(tmp_path):
    model, loader = _model_and_loader()
    clean = loader.vision.clone()

    class PoisonedAtEpoch3(FeaturePairBatches):
        def set_epoch(self, epoch):
            super().set_epoch(epoch)
            self.vision = clean.clone()
            if epoch == 2:
                self.vision[:] = float("nan")  # a corrupted feature cache

    poisoned = PoisonedAtEpoch3(clean, loader.text, torch.arange(64), 16, seed=1)
    ckpt = tmp_path / "aligner"
    with pytest.raises(FloatingPointError, match=rf"loss is nan at step 9 \(epoch 3\).*{ckpt} \(epoch 2\)"):
        train_alignment(model, poisoned, progress=False, evaluate=lambda: {"v": 1.0 - model.logit_scale.item()},
                        monitor="v", save_best=lambda epoch: model.save_pretrained(ckpt), checkpoint=str(ckpt))
    before = (ckpt / "model.safetensors").read_bytes()
    reloaded = VisionTextAligner.from_pretrained(ckpt)  # the best checkpoint is intact and loads
    assert all(torch.isfinite(v).all() for v in reloaded.trainable_state_dict().values())
    assert (ckpt / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("shuffle", [True, False])
def test_length_grouped_caption_batches_cover_every_caption_once_and_repeat_after_resume(shuffle):
    from mmalign.data.dataset import CaptionBatches

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 30, (203,), generator=g).tolist()
    caps = [[i] * n for i, n in enumerate(lengths)]  # caption i is made of its own index

    def batches(epoch: int) -> list[list[int]]:
        loader = CaptionBatches(torch.zeros(203, 2), caps, torch.arange(203), batch_size=8, seed=3, shuffle=shuffle,
                                group_by_length=True, megabatch=4)
        loader.set_epoch(epoch)
        return [[c[0] for c in b["captions"]] for b in loader]

    first = batches(1)
    assert len(first) == 26 and sorted(i for b in first for i in b) == list(range(203))  # each caption once
    assert batches(1) == first  # a resumed run (a fresh loader at the same epoch) sees the same batches
    if shuffle:
        assert batches(2) != first
    ungrouped = CaptionBatches(torch.zeros(203, 2), caps, torch.arange(203), batch_size=8, seed=3, shuffle=shuffle)
    ungrouped.set_epoch(1)
    padding = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)  # noqa: E731
    assert padding(first) < padding([[c[0] for c in b["captions"]] for b in ungrouped]) / 2
