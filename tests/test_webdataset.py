"""img2dataset / WebDataset shards as a data source: folder, single .tar, glob and brace patterns, the
sidecar files ignored, bad members counted; the whole pipeline on shards; sharded (2-process)
extraction equal to 1 process byte for byte; a lean prepare; a float16 feature cache."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from conftest import ROOT, STAGE_ARGS, deep_update, run_stages
from mmalign.config import PrepareConfig, from_dict
from mmalign.data.webdataset import iter_samples, shard_paths
from mmalign.data.features import load_features
from mmalign.pipeline.prepare import user_dataset
from test_sources import GOOD_JPEG, png


def write_shards(folder: Path, n_shards: int = 3, per_shard: int = 8, bad: bool = True) -> Path:
    """img2dataset's output layout: 0000N.tar (key.jpg/.txt/.json) + 0000N.parquet + 0000N_stats.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"
                i = s * per_shard + j
                members = {f"{key}.jpg": png(i, "JPEG"), f"{key}.txt": f"a photo number {i} of a thing".encode(),
                           f"{key}.json": json.dumps({"key": key, "status": "success"}).encode()}
                if bad and s == 0 and j == 0:
                    members[f"{key}.jpg"] = GOOD_JPEG[:200]  # truncated download
                if bad and s == 0 and j == 1:
                    del members[f"{key}.txt"]  # caption member missing
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1 not read")
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard}))
    return folder


def test_patterns_name_the_tar_shards_only(tmp_path):
    d = write_shards(tmp_path / "shards")
    tars = [d / f"{s:05d}.tar" for s in range(3)]
    assert shard_paths(str(d)) == tars
    assert shard_paths(str(d / "*.tar")) == tars
    assert shard_paths(str(d / "{00000..00002}.tar")) == tars
    assert shard_paths(str(d / "{00000,00002}.tar")) == [tars[0], tars[2]]
    assert shard_paths(str(tars[1])) == [tars[1]]
    with pytest.raises(ValueError, match=r"no shard .*00003\.tar.*Fix:"):
        shard_paths(str(d / "{00000..00007}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder with no .tar shards"):
        shard_paths(str(tmp_path / "empty"))


def test_members_group_by_key_and_missing_members_are_none(tmp_path):
    d = write_shards(tmp_path / "shards", n_shards=1, per_shard=3)
    rows = list(iter_samples(shard_paths(str(d)), ["jpg", "png"], "txt"))
    assert [r["id"] for r in rows] == ["00000.tar/000000000", "00000.tar/000000001", "00000.tar/000000002"]
    assert rows[1]["captions"] is None and rows[2]["captions"] == "a photo number 2 of a thing"
    assert rows[2]["image"]["bytes"][:2] == b"\xff\xd8"  # the JPEG as stored, not re-encoded


def _cfg(path: str, **kw) -> PrepareConfig:
    return from_dict(PrepareConfig, {"source": "webdataset", "webdataset": {"path": path}, **kw})


def test_bad_members_stop_or_are_counted(tmp_path):
    d = write_shards(tmp_path / "shards")
    with pytest.raises(ValueError, match=r"bad sample '00000\.tar/000000000' .*truncated"):
        user_dataset(_cfg(str(d)), tmp_path / "w1")
    ds, skipped = user_dataset(_cfg(str(d), on_bad_sample="skip", split_ratios=[0.5, 0.25, 0.25]), tmp_path / "w2")
    assert skipped == {"missing_caption": 1, "truncated_image": 1}
    assert {k: len(v) for k, v in ds.items()} == {"train": 10, "val": 6, "test": 6}  # 22 good, split after


@pytest.fixture
def shard_params(tmp_path, tiny_params_file, tiny_clip_dir, tiny_llm_dir):
    shards = write_shards(tmp_path / "cc3m")
    params = deep_update(yaml.safe_load(tiny_params_file.read_text()), {
        "modalities": {"audio": False},  # image shards: the image stages alone
        "models": {"vision": str(tiny_clip_dir), "llm": str(tiny_llm_dir)},
        "prepare": {"source": "webdataset", "on_bad_sample": "skip", "split_ratios": [0.5, 0.25, 0.25],
                    "webdataset": {"path": str(shards / "{00000..00002}.tar")}},
        "align": {"batch_size": 4}, "project": {"batch_size": 4}})
    tiny_params_file.write_text(yaml.safe_dump(params))
    return tiny_params_file


def test_the_whole_pipeline_on_img2dataset_shards(tmp_path, shard_params, mlflow_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_stages(shard_params)
    report = json.loads((tmp_path / "data/prepare_report.json").read_text())
    assert report["skipped"] == {"missing_caption": 1, "truncated_image": 1}
    assert {k: v["items"] for k, v in report["splits"].items()} == {"train": 10, "val": 6, "test": 6}
    metrics = json.loads((tmp_path / "eval/metrics_all.json").read_text())["image"]
    assert metrics["retrieval"]["chance"]["t2i"]["R1"] == pytest.approx(1 / 6)
    assert "CIDEr" in metrics["captioning"]["trained"]
    # Lean outputs: captions and ids for every split, images only for the test split (evaluate's figures).
    ds = datasets.load_from_disk(str(tmp_path / "data/dataset"))
    assert ds["train"].column_names == ["id", "captions"] and "image" in ds["test"].column_names
    assert not list(tmp_path.glob("data/.*work*"))  # the temporary full copy is gone


def _prepare(params: Path, cwd: Path, processes: int) -> subprocess.CompletedProcess:
    (cwd / "configs").mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((ROOT / "configs/accelerate.yaml").read_text())
    (cwd / "configs/accelerate.yaml").write_text(yaml.safe_dump({**cfg, "num_processes": processes}))
    # CPU reductions round by thread count: the same count per process in both runs (distributed.init)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMALIGN_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(ROOT / "stages/launch.py"), str(ROOT / "stages/prepare.py"),
                           "--params", str(params), *STAGE_ARGS["prepare"]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_two_process_extraction_equals_one_process_byte_for_byte(tmp_path, shard_params, mlflow_uri):
    params = yaml.safe_load(shard_params.read_text())
    params["prepare"]["batch_size"] = 3  # several batches per split, a partial last one
    shard_params.write_text(yaml.safe_dump(params))
    for n in (1, 2):
        out = _prepare(shard_params, tmp_path / f"p{n}", n)
        assert out.returncode == 0, out.stderr[-3000:]
    one, two = tmp_path / "p1/data/features", tmp_path / "p2/data/features"
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir()) and "train.safetensors" in files
    for name in files:
        if name.endswith(".safetensors"):
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    fingerprint = [json.loads((d / "fingerprint.json").read_text()) for d in (one, two)]
    assert [f["files"] for f in fingerprint][0] == fingerprint[1]["files"]  # (dataset fingerprints name the dir)
    assert not list((tmp_path / "p2/data").glob(".*shards*"))


def test_float16_cache_halves_the_features_and_reads_back_as_float32(tmp_path, shard_params, mlflow_uri,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_stages(shard_params, "prepare")
    full = load_features("data/features", "train")
    size32 = Path("data/features/train.safetensors").stat().st_size
    params = yaml.safe_load(shard_params.read_text())
    params["prepare"]["feature_dtype"] = "float16"
    shard_params.write_text(yaml.safe_dump(params))
    run_stages(shard_params, "prepare")
    half = load_features("data/features", "train")
    streamed = load_features("data/features", "train", stream=True)
    assert half.vision.dtype == torch.float32 and streamed.vision[:3].dtype == torch.float32
    assert torch.equal(half.vision, full.vision.half().float()) and torch.equal(streamed.text[:], half.text)
    assert Path("data/features/train.safetensors").stat().st_size < 0.55 * size32
