"""Small shared helpers: the prefetching iterator, atomic writes and verified checkpoints."""

from __future__ import annotations

import logging
import os
import re
import threading

import pytest
import torch
from safetensors.torch import load_file

from mmalign.utils import atomic_path, load_checkpoint, prefetch, save_checkpoint


def test_prefetch_keeps_order_and_reads_ahead():
    seen: list[int] = []

    def source():
        for i in range(20):
            seen.append(i)
            yield i

    it = prefetch(source(), depth=2)
    assert next(it) == 0
    assert list(it) == list(range(1, 20))
    assert seen == list(range(20))


def test_prefetch_raises_the_threads_error_with_its_type():
    def source():
        yield 1
        raise KeyError("bad sample 7")

    it = prefetch(source())
    assert next(it) == 1
    with pytest.raises(KeyError, match="bad sample 7"):
        next(it)


def test_prefetch_stops_its_thread_when_the_consumer_stops():
    before = threading.active_count()
    it = prefetch(iter(range(10_000)), depth=2)
    next(it)
    it.close()
    assert threading.active_count() == before


def test_atomic_path_leaves_the_old_output_when_the_writer_fails(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def _damage_tensor_data(path, n=4096):
    """Overwrite n bytes (same size) in the middle of the tensor data, past the safetensors header."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # u64 header length, then the JSON header
    mid = (start + len(data)) // 2
    data[mid:mid + n] = bytes(range(256)) * (n // 256)
    path.write_bytes(bytes(data))


def test_checkpoint_round_trip_writes_a_checksum(tmp_path):
    w = torch.randn(64, 64)
    save_checkpoint(tmp_path / "ckpt", {"w": w}, {"dim": 64})
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["checksums.json", "config.json", "model.safetensors"]
    tensors, cfg = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(tensors["w"], w) and cfg == {"dim": 64}


def test_checkpoint_damaged_in_place_is_refused(tmp_path):
    d = tmp_path / "ckpt"
    save_checkpoint(d, {"w": torch.randn(256, 256)}, {"dim": 256})
    size = (d / "model.safetensors").stat().st_size
    _damage_tensor_data(d / "model.safetensors")
    assert (d / "model.safetensors").stat().st_size == size
    load_file(d / "model.safetensors")  # safetensors itself does not notice
    with pytest.raises(ValueError, match=rf"^checkpoint {re.escape(str(d))}/model\.safetensors is damaged .*"
                                         rf"delete {re.escape(str(d))} and re-run the stage that writes it$"):
        load_checkpoint(d)


def test_checkpoint_without_checksum_loads_with_a_warning(tmp_path, caplog):
    d = tmp_path / "ckpt"
    save_checkpoint(d, {"w": torch.ones(3)}, {})
    (d / "checksums.json").unlink()  # as written before checksums existed
    with caplog.at_level(logging.WARNING, logger="mmalign.utils"):
        tensors, _ = load_checkpoint(d)
    assert torch.equal(tensors["w"], torch.ones(3))
    assert "has no checksums.json" in caplog.text and str(d) in caplog.text


@pytest.mark.parametrize("given, expected", [({}, {"GOMP_SPINCOUNT": "3000"}),
                                             ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "PASSIVE"}),
                                             ({"GOMP_SPINCOUNT": "0"}, {"GOMP_SPINCOUNT": "0"})])
def test_process_env_bounds_openmp_spinning_unless_the_user_chose(monkeypatch, given, expected):
    """Entry points bound libgomp's spin-wait (benchmarks/bench_omp_wait.py); a policy the user set stays."""
    from mmalign.entry import process_env

    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(var, raising=False)
    for var, value in given.items():
        monkeypatch.setenv(var, value)
    process_env()
    assert {v: os.environ[v] for v in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if v in os.environ} == expected
