"""Data-parallel training: 2 processes (gloo, CPU) compute what 1 process computes on the whole batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.training import distributed
from mmalign.config import AlignmentConfig
from tests.helpers.ddp_fit import run as fit_tiny

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")


def launch(out: Path, term: str, n: int) -> None:
    """`accelerate launch` with the repo's config, as dvc.yaml runs the training stages."""
    cmd = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs/accelerate.yaml"), "--num_processes",
           str(n), str(ROOT / "tests/helpers/ddp_fit.py"), str(out), term]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("term", ["clip", "mrl"])
def test_two_process_ddp_equals_one_process_on_the_whole_batch(tmp_path, term):
    fit_tiny(tmp_path / "single", term)
    launch(tmp_path / "ddp", term, 2)
    ref, ref_meta = load_file(tmp_path / "single/rank0.safetensors"), json.loads((tmp_path / "single/rank0.json").read_text())
    assert ref_meta["world_size"] == 1
    for r in (0, 1):
        got, meta = load_file(tmp_path / f"ddp/rank{r}.safetensors"), json.loads((tmp_path / f"ddp/rank{r}.json").read_text())
        assert meta["world_size"] == 2
        assert len(meta["losses"]) == len(ref_meta["losses"]) == 3
        for step, (a, b) in enumerate(zip(meta["losses"], ref_meta["losses"])):
            for k in b:  # loss, clip, mrl, dim_*, grad_norm: each the global-batch value
                assert a[k] == pytest.approx(b[k], abs=1e-5, rel=1e-5), (r, step, k)
        assert ref.keys() == got.keys()
        grads = [k for k in ref if k.startswith("step")]
        assert any("adapters.image" in k for k in grads) and any("text_adapter" in k for k in grads)
        for k in ref:  # every step's adapter + temperature gradients, and the trained weights
            torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5, msg=lambda m: f"rank {r} {k}: {m}")
        assert any(ref[k].abs().max() > 1e-3 for k in grads)  # the gradients are not trivially zero


def test_single_process_helpers_are_identity():
    x = torch.randn(4, 3, requires_grad=True)
    assert distributed.world_size() == 1 and distributed.is_main_process()
    assert distributed.gather_with_grad(x) is x
    batch = {"a": torch.arange(5), "b": list("abcde")}
    assert distributed.shard(batch) is batch
    assert distributed.broadcast({"v": 1}) == {"v": 1}


def test_bf16_autocast_trains_on_cpu(tmp_path):
    from mmalign.models.aligner import VisionTextAligner
    from mmalign.data.dataset import FeaturePairBatches
    from mmalign.training.train import train_alignment

    torch.manual_seed(0)
    cfg = AlignmentConfig(vision_dim=12, text_dim=10, d_align=16, hidden_dim=24, mrl_dims=[8, 16], batch_size=8,
                          num_epochs=2, mixed_precision="bf16")
    model = VisionTextAligner(cfg)
    hist = train_alignment(model, FeaturePairBatches(torch.randn(32, 12), torch.randn(32, 10), torch.arange(32), 8),
                           progress=False)
    losses = [s["train/loss"] for s in hist["steps"]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay float32


@pytest.mark.parametrize("value", ["fp16", "no", False])
def test_mixed_precision_is_validated(value):
    with pytest.raises(ValueError, match="mixed_precision"):
        AlignmentConfig(mixed_precision=value)
