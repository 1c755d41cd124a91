"""Feature cache: equals a direct encoder forward, verified by checksum, rebuilt only when needed."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

import mmalign.data.features as features
from mmalign.config import PrepareConfig
from mmalign.models.encoders import FrozenTextEncoder, FrozenVisionEncoder
from mmalign.hub import MINILM_ID
from mmalign.data.features import build_feature_cache, load_features
from mmalign.pipeline.prepare import synthetic_dataset

N_TRAIN, N_VAL = 5, 2


@pytest.fixture(scope="module")
def vision(tiny_clip_dir) -> FrozenVisionEncoder:
    return FrozenVisionEncoder(str(tiny_clip_dir), pooling="grid", grid=2)


@pytest.fixture(scope="module")
def text() -> FrozenTextEncoder:
    return FrozenTextEncoder(MINILM_ID)


@pytest.fixture(scope="module")
def dataset(tiny_data):
    """The pipeline's DatasetDict, for the first rows of the `tiny_data` splits (same seed and sizes)."""
    ds = synthetic_dataset(PrepareConfig(seed=0, n_train=N_TRAIN, n_val=N_VAL, n_test=1, image_size=32,
                                         captions_per_image=3))
    for name, n in (("train", N_TRAIN), ("val", N_VAL)):
        assert ds[name]["id"] == [r["id"] for r in tiny_data[name][:n]]
        assert ds[name]["captions"] == [r["captions"] for r in tiny_data[name][:n]]
    return ds


@pytest.fixture(scope="module")
def cache(tmp_path_factory, dataset, vision, text):
    out = tmp_path_factory.mktemp("features") / "cache"
    fingerprint = build_feature_cache(dataset, vision, text, out, batch_size=3)  # 5 train images: batches of 3 and 2
    return out, fingerprint


def test_cache_equals_direct_encoder_forward(cache, tiny_data, vision, text):
    out, fingerprint = cache
    assert fingerprint["dim"] == vision.dim == 32 * 2 * 2 and fingerprint["text_dim"] == text.dim == 384
    for name, n in (("train", N_TRAIN), ("val", N_VAL)):
        rows = tiny_data[name][:n]
        feats = load_features(out, name)
        direct_v = vision(vision.preprocess([r["image"] for r in rows]))  # the original PIL images, one batch
        captions = [c for r in rows for c in r["captions"]]
        direct_t = text(captions)
        assert feats.vision.shape == (n, vision.dim) and feats.text.shape == (3 * n, 384)
        assert feats.vision.dtype == feats.text.dtype == torch.float32
        torch.testing.assert_close(feats.vision, direct_v, atol=1e-5, rtol=0)
        torch.testing.assert_close(feats.text, direct_t, atol=1e-5, rtol=0)
        assert fingerprint["files"][name]["items"] == n and fingerprint["files"][name]["captions"] == 3 * n


def test_bf16_cache_equals_a_direct_forward_under_autocast_and_is_recorded(tmp_path, dataset, tiny_data, vision,
                                                                           text, cache):
    """prepare.mixed_precision: bf16 extracts under bf16 autocast (both encoders), stores float32, records it; a
    float32 cache of the same data is not reused for it."""
    out = tmp_path / "bf16"
    fp = build_feature_cache(dataset, vision, text, out, batch_size=3, mixed_precision="bf16")
    assert fp["mixed_precision"] == "bf16" and cache[1]["mixed_precision"] == "none"
    rows = tiny_data["train"][:N_TRAIN]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct_v = torch.cat([vision(vision.preprocess([r["image"] for r in rows[i:i + 3]])) for i in (0, 3)])
        direct_t = text([c for r in rows for c in r["captions"]])
    feats, fp32 = load_features(out, "train"), load_features(cache[0], "train")
    assert feats.vision.dtype == feats.text.dtype == torch.float32
    torch.testing.assert_close(feats.vision, direct_v, atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.text, direct_t, atol=1e-5, rtol=0)
    assert not torch.equal(feats.text, fp32.text)  # really computed in bf16 ...
    cos = torch.nn.functional.cosine_similarity(feats.text, fp32.text)
    assert cos.min() > 0.999  # ... and close to float32
    shutil.copytree(cache[0], tmp_path / "reuse")
    assert build_feature_cache(dataset, vision, text, tmp_path / "reuse", batch_size=3,
                               mixed_precision="bf16")["mixed_precision"] == "bf16"
    torch.testing.assert_close(load_features(tmp_path / "reuse", "train").text, feats.text, atol=0, rtol=0)


def test_auto_precision_is_bf16_only_where_the_device_has_it(monkeypatch):
    from mmalign.training.distributed import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "none") == "none" and resolve_precision(cpu, "bf16") == "bf16"
    for amx, avx in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx, raising=False)
        assert resolve_precision(cpu, "auto") == ("bf16" if amx or avx else "none")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision(torch.device("cuda"), "auto") == "none"


def test_text_to_image_maps_each_caption_to_its_image(cache, tiny_data, text):
    out, _ = cache
    feats = load_features(out, "train")
    rows = tiny_data["train"][:N_TRAIN]
    assert feats.text_to_image.dtype == torch.long
    assert feats.text_to_image.tolist() == [i for i in range(N_TRAIN) for _ in range(3)]
    # caption j's feature is the encoding of one of the captions of image text_to_image[j] (and of no other)
    picked = (0, 4, 3 * N_TRAIN - 1)
    images = [int(feats.text_to_image[j]) for j in picked]
    assert images == [0, 1, N_TRAIN - 1]
    own = text([c for i in images for c in rows[i]["captions"]]).view(len(picked), 3, -1)  # one encoder call
    for k, j in enumerate(picked):
        dist = (own - feats.text[j]).abs().amax(dim=-1)  # (images, 3): distance to every picked caption
        assert dist[k].min() < 1e-5  # one of its own image's captions
        assert all(dist[other].min() > 1e-3 for other in range(len(picked)) if other != k)


def _copy(cache, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(cache[0], out)
    return out


@pytest.mark.parametrize("damage", ["truncate", "modify"])
def test_load_features_detects_corrupt_split_file(cache, tmp_path, damage):
    out = _copy(cache, tmp_path)
    f = out / "train.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    else:
        data[-5] ^= 0xFF  # one byte of tensor data: same size, still loadable, different numbers
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(f))):
        load_features(out, "train")
    assert load_features(out, "val").num_images == N_VAL  # the intact split still loads


def test_load_features_unknown_split_names_it(cache):
    with pytest.raises(ValueError, match="no split 'nope'"):
        load_features(cache[0], "nope")


def test_up_to_date_cache_is_not_reencoded(cache, tmp_path, dataset, vision, text, monkeypatch):
    out = _copy(cache, tmp_path)

    def boom(*a, **k):
        raise AssertionError("encode_split called on an up-to-date cache")

    monkeypatch.setattr(features, "encode_split", boom)
    fp = build_feature_cache(dataset, vision, text, out, batch_size=3)
    assert fp == cache[1]


def test_corrupt_cache_is_rebuilt(cache, tmp_path, dataset, vision, text, monkeypatch):
    out = _copy(cache, tmp_path)
    f = out / "val.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    calls = []
    real = features.encode_split

    def counting(split, *a, **k):
        calls.append(len(split))
        return real(split, *a, **k)

    monkeypatch.setattr(features, "encode_split", counting)
    build_feature_cache(dataset, vision, text, out, batch_size=3)
    assert sorted(calls) == sorted(len(s) for s in dataset.values())  # every split re-encoded
    rebuilt, original = load_features(out, "val"), load_features(cache[0], "val")
    torch.testing.assert_close(rebuilt.vision, original.vision, atol=1e-6, rtol=0)
    torch.testing.assert_close(rebuilt.text, original.text, atol=1e-6, rtol=0)
    assert not list(tmp_path.glob(".cache.*"))  # no temporary left next to it


def test_cache_built_with_other_pooling_is_rebuilt(cache, tmp_path, dataset, text, tiny_clip_dir, monkeypatch):
    out = _copy(cache, tmp_path)
    other = FrozenVisionEncoder(str(tiny_clip_dir), pooling="mean")
    calls = []
    real = features.encode_split
    monkeypatch.setattr(features, "encode_split", lambda split, *a, **k: calls.append(1) or real(split, *a, **k))
    fp = build_feature_cache(dataset, other, text, out, batch_size=8)
    assert calls and fp["pooling"] == "mean" and fp["dim"] == 32
    assert load_features(out, "train").vision.shape == (N_TRAIN, 32)


@pytest.mark.parametrize("pooling,grid,dim", [("cls", 4, 32), ("mean", 4, 32), ("grid", 1, 32), ("grid", 2, 128),
                                              ("grid", 4, 512)])
def test_pooling_modes_give_documented_dims(tiny_clip_dir, tiny_data, pooling, grid, dim):
    enc = FrozenVisionEncoder(str(tiny_clip_dir), pooling=pooling, grid=grid)
    hidden = enc.model.config.hidden_size
    assert hidden == 32
    assert enc.dim == dim == (hidden * grid * grid if pooling == "grid" else hidden)
    px = enc.preprocess([r["image"] for r in tiny_data["train"][:3]])
    assert px.shape == (3, 3, 32, 32)
    feats = enc(px)
    assert feats.shape == (3, dim) and torch.isfinite(feats).all()
    if pooling == "mean" or (pooling == "grid" and grid == 1):
        # both average all patch tokens (CLS excluded)
        with torch.no_grad():
            patches = enc.model(pixel_values=px).last_hidden_state[:, 1:]
        torch.testing.assert_close(feats, patches.mean(1), atol=1e-5, rtol=0)


def test_unknown_pooling_is_rejected(tiny_clip_dir):
    with pytest.raises(ValueError, match="pooling"):
        FrozenVisionEncoder(str(tiny_clip_dir), pooling="max")


def test_streamed_features_equal_loaded_ones(cache):
    cache, _ = cache
    full, streamed = load_features(cache, "train"), load_features(cache, "train", stream=True)
    assert isinstance(streamed.vision, features.StreamedRows)
    assert torch.equal(streamed.text_to_image, full.text_to_image)
    for name in ("items", "text"):
        a, s = getattr(full, name), getattr(streamed, name)
        assert s.shape == a.shape and len(s) == len(a) and s.dtype == a.dtype
        idx = torch.tensor([len(a) - 1, 0, 3, 3])
        assert torch.equal(s[idx], a[idx])  # a shuffled batch, repeats included
        assert torch.equal(s[2:7], a[2:7]) and torch.equal(s[::5], a[::5]) and torch.equal(s[4], a[4])
        assert torch.equal(s.load(), a) and s[len(a):].shape == (0, a.shape[1])
        with pytest.raises(IndexError):
            s[torch.tensor([len(a)])]


def test_streamed_rows_of_a_truncated_file_say_so(cache, tmp_path):
    cache, _ = cache
    bad = tmp_path / "feats"
    shutil.copytree(cache, bad)
    f = bad / "train.safetensors"
    rows = features.StreamedRows(f, "features")
    f.write_bytes(f.read_bytes()[: rows.offset + rows.row_bytes * 2])
    assert rows[0:2].shape[0] == 2
    with pytest.raises(ValueError, match="truncated.*dvc repro --force -s prepare"):
        rows[0:3]
