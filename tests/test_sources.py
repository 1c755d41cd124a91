"""User data: `datasets` datasets (save_to_disk, parquet) and image folders (metadata.jsonl / .csv) through
prepare -> align -> evaluate; every bad input stops with one line under `error` and is counted under `skip`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import mlflow
import pytest
import yaml
from PIL import Image

from conftest import deep_update, run_stages
from mmalign.config import PrepareConfig, from_dict
from mmalign.pipeline.prepare import user_dataset

N_CAPS = 5
RETRIEVAL_ONLY = ["--aligner", "models/aligner", "--features", "data/features",
                  "--dataset", "data/dataset", "--out", "eval"]


def png(i: int, fmt: str = "PNG") -> bytes:
    """A small image of a colour unique to i."""
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), ((37 * i) % 256, (91 * i) % 256, 255 - (53 * i) % 256)).save(buf, fmt)
    return buf.getvalue()


GOOD_JPEG = png(9, fmt="JPEG")


def captions(i: int) -> list[str]:
    return [f"picture {i} seen in way {j}" for j in range(N_CAPS)]


def dataset_5_captions(n: int, start: int = 0) -> datasets.Dataset:
    """Flickr30k style: one row per image, a list of 5 captions."""
    return datasets.Dataset.from_dict(
        {"image": [Image.open(io.BytesIO(png(i))) for i in range(start, start + n)],
         "caption": [captions(i) for i in range(start, start + n)]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string"))}))


def dataset_row_per_caption(n: int) -> datasets.Dataset:
    """COCO-annotation style: one row per caption, grouped by image_id."""
    rows = [(i, {"bytes": png(i), "path": None}, c) for i in range(n) for c in captions(i)]
    return datasets.Dataset.from_dict(
        {"image_id": [r[0] for r in rows], "image": [r[1] for r in rows], "caption": [r[2] for r in rows]},
        features=datasets.Features({"image_id": datasets.Value("int64"), "image": datasets.Image(),
                                    "caption": datasets.Value("string")}))


def write_folder(folder: Path, files: dict[str, bytes], rows: list[dict], fmt: str = "jsonl") -> Path:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if fmt == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        keys = list(rows[0])
        (folder / "metadata.csv").write_text(",".join(keys) + "\n" + "".join(
            ",".join(f'"{r[k]}"' for k in keys) + "\n" for r in rows))
    return folder


def good_folder(folder: Path, ids: range, fmt: str = "jsonl") -> dict[str, bytes]:
    files = {f"{i}.png": png(i) for i in ids}
    if fmt == "jsonl":  # one row per image, a list of captions
        rows = [{"file_name": f"{i}.png", "text": captions(i)} for i in ids]
    else:  # CSV: one caption per row, several rows per file
        rows = [{"file_name": f"{i}.png", "text": c} for i in ids for c in captions(i)]
    write_folder(folder, files, rows, fmt)
    return files


@pytest.fixture(scope="module")
def shared_mlflow(tmp_path_factory):
    """One MLflow store for the module's pipelines (creating a store costs seconds)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
        yield


@pytest.fixture
def run_pipeline(tmp_path, tiny_params_file, tiny_clip_dir, tiny_llm_dir, shared_mlflow, monkeypatch):
    """prepare + align + evaluate (retrieval only) on tiny local models, with a `prepare` section override."""
    monkeypatch.chdir(tmp_path)

    def run(prepare_params: dict) -> dict:
        params = deep_update(yaml.safe_load(tiny_params_file.read_text()), {
            "modalities": {"audio": False},  # image sources: the image stages alone
            "models": {"vision": str(tiny_clip_dir), "llm": str(tiny_llm_dir)},
            "prepare": prepare_params, "align": {"batch_size": 4}, "evaluate": {"captioning": False}})
        tiny_params_file.write_text(yaml.safe_dump(params))
        run_stages(tiny_params_file, "prepare", "align", "evaluate", args={"evaluate": RETRIEVAL_ONLY})
        return json.loads((tmp_path / "data/prepare_report.json").read_text())

    return run


def check_outputs(d: Path, sizes: dict[str, int]) -> datasets.DatasetDict:
    ds = datasets.load_from_disk(str(d / "data/dataset"))
    assert {k: len(v) for k, v in ds.items()} == sizes
    assert all(len(c) == N_CAPS for c in ds["train"]["captions"])
    assert ds["test"][0]["image"].mode == "RGB"
    ret = json.loads((d / "eval/metrics_all.json").read_text())["image"]["retrieval"]
    assert ret["chance"]["t2i"]["R1"] == pytest.approx(1 / sizes["test"])
    assert ret["n_captions"] == N_CAPS * sizes["test"]
    return ds


def test_saved_dataset_with_5_captions_per_image(tmp_path, run_pipeline):
    src = datasets.DatasetDict({"train": dataset_5_captions(8), "validation": dataset_5_captions(4, 8),
                                "test": dataset_5_captions(4, 12)})
    src.save_to_disk(str(tmp_path / "flickr"))
    report = run_pipeline({"source": "hf", "hf": {"path": str(tmp_path / "flickr")}})
    assert report["splits"]["train"] == {"items": 8, "captions": 40} and report["skipped"] == {}
    ds = check_outputs(tmp_path, {"train": 8, "val": 4, "test": 4})
    assert ds["test"]["captions"][0] == captions(12) and ds["test"]["id"][0] == "test/0"


def test_parquet_with_one_row_per_caption_is_grouped_by_id(tmp_path, run_pipeline):
    dataset_row_per_caption(16).to_parquet(str(tmp_path / "coco.parquet"))
    report = run_pipeline({"source": "hf", "split_ratios": [0.5, 0.25, 0.25],
                           "hf": {"path": str(tmp_path / "coco.parquet"), "id_column": "image_id"}})
    assert report["splits"]["test"] == {"items": 4, "captions": 20}
    ds = check_outputs(tmp_path, {"train": 8, "val": 4, "test": 4})
    ids = [i for split in ds.values() for i in split["id"]]
    assert sorted(ids, key=int) == [str(i) for i in range(16)]  # every image in exactly one split
    row = ds["val"][0]
    assert row["captions"] == captions(int(row["id"]))


def test_image_folder_with_jsonl_split_folders(tmp_path, run_pipeline):
    for name, ids in (("train", range(8)), ("validation", range(8, 12)), ("test", range(12, 16))):
        good_folder(tmp_path / "pics" / name, ids)
    report = run_pipeline({"source": "imagefolder", "imagefolder": {"path": str(tmp_path / "pics")}})
    assert report["source"] == "imagefolder" and report["skipped"] == {}
    ds = check_outputs(tmp_path, {"train": 8, "val": 4, "test": 4})
    assert ds["test"]["id"][0] == "12.png" and ds["test"]["captions"][0] == captions(12)


def test_image_folder_with_csv_one_split_and_bad_files_skipped(tmp_path, run_pipeline):
    good_folder(tmp_path / "pics", range(16), fmt="csv")
    bad = {"empty.jpg": b"", "text.jpg": b"not an image", "cut.jpg": GOOD_JPEG[:300], "blank.png": png(99)}
    for name, data in bad.items():
        (tmp_path / "pics" / name).write_bytes(data)
    with (tmp_path / "pics/metadata.csv").open("a") as f:
        f.write("".join(f'"{name}","{"  " if name == "blank.png" else "a caption"}"\n' for name in [*bad, "gone.png"]))
    report = run_pipeline({"source": "imagefolder", "on_bad_sample": "skip", "split_ratios": [0.5, 0.25, 0.25],
                           "imagefolder": {"path": str(tmp_path / "pics")}})
    assert report["skipped"] == {"empty_caption": 1, "empty_file": 1, "missing_file": 1, "truncated_image": 1,
                                 "unreadable_image": 1}
    n = {k: v["items"] for k, v in report["splits"].items()}
    assert n == {"train": 8, "val": 4, "test": 4}  # bad files go before the 0.5/0.25/0.25 split, not after
    assert sum(n.values()) == 16 and all(v["captions"] == N_CAPS * v["items"] for v in report["splits"].values())
    check_outputs(tmp_path, n)
    prep = [r for r in mlflow.search_runs(experiment_names=["mmalign"], output_format="list")
            if r.data.tags.get("mmalign.stage") == "prepare" and r.data.metrics.get("skipped.total") == 5]
    assert prep and prep[0].data.metrics["skipped.unreadable_image"] == 1


# --- bad inputs, library level: one line under `error`, counted under `skip` ---

def folder_with_one_bad(tmp_path: Path, bad_file: bytes | None, bad_row: dict) -> Path:
    """Split folders; train holds 4 good images and the bad row `bad.jpg`."""
    root = tmp_path / "pics"
    for name, ids in (("validation", [4]), ("test", [5])):
        good_folder(root / name, ids)
    rows = [{"file_name": f"{i}.png", "text": captions(i)} for i in range(4)] + [{"file_name": "bad.jpg", **bad_row}]
    files = {f"{i}.png": png(i) for i in range(4)} | ({"bad.jpg": bad_file} if bad_file is not None else {})
    write_folder(root / "train", files, rows)
    return root


BAD = {  # kind: (bytes of bad.jpg (None: absent), its metadata, reason, words of the one-line error)
    "truncated": (GOOD_JPEG[: len(GOOD_JPEG) // 2], {"text": "x"}, "truncated_image", "truncated"),
    "zero_bytes": (b"", {"text": "x"}, "empty_file", "0 bytes"),
    "text_as_jpg": (b"just some text", {"text": "x"}, "unreadable_image", "not an image file"),
    "missing_file": (None, {"text": "x"}, "missing_file", "does not exist"),
    "missing_caption": (GOOD_JPEG, {}, "missing_caption", "null"),
    "null_caption": (GOOD_JPEG, {"text": None}, "missing_caption", "null"),
    "no_captions": (GOOD_JPEG, {"text": []}, "missing_caption", "no caption"),
    "empty_caption": (GOOD_JPEG, {"text": ["fine", "   "]}, "empty_caption", "caption 1 of 2 is blank"),
}


def _cfg(path: Path, **kw) -> PrepareConfig:
    return from_dict(PrepareConfig, {"source": "imagefolder", "imagefolder": {"path": str(path)}, **kw})


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_sample_stops_with_one_line_or_is_counted(tmp_path, kind):
    data, row, reason, words = BAD[kind]
    root = folder_with_one_bad(tmp_path, data, row)
    with pytest.raises(ValueError) as info:
        user_dataset(_cfg(root), tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "bad.jpg" in msg and words in msg and "on_bad_sample: skip" in msg
    assert (f"file '{root}/train/bad.jpg'" in msg) and "split 'train'" in msg
    ds, skipped = user_dataset(_cfg(root, on_bad_sample="skip"), tmp_path)
    assert skipped == {reason: 1}
    assert {k: len(v) for k, v in ds.items()} == {"train": 4, "val": 1, "test": 1}
    assert sorted(ds["train"]["id"]) == ["0.png", "1.png", "2.png", "3.png"]


def test_hf_bad_rows_are_named_by_id(tmp_path):
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": png(0), "path": None}, {"bytes": b"", "path": None}, {"bytes": png(2), "path": None}],
         "caption": [captions(0), captions(1), ["fine", ""]], "key": ["a", "b", "c"]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string")),
                                    "key": datasets.Value("string")}))
    datasets.DatasetDict({"train": ds, "validation": ds, "test": ds}).save_to_disk(str(tmp_path / "d"))
    cfg = {"source": "hf", "hf": {"path": str(tmp_path / "d"), "id_column": "key"}}
    with pytest.raises(ValueError, match=r"^bad sample 'b' \(split 'train'\): empty file: 0 bytes\. "):
        user_dataset(from_dict(PrepareConfig, cfg), tmp_path)
    out, skipped = user_dataset(from_dict(PrepareConfig, {**cfg, "on_bad_sample": "skip"}), tmp_path)
    assert skipped == {"empty_file": 3, "empty_caption": 3}  # counted in each of the 3 splits
    assert out["train"]["id"] == ["a"]


def test_missing_column_lists_the_columns(tmp_path):
    dataset_5_captions(3).rename_column("caption", "sentences").save_to_disk(str(tmp_path / "d"))
    cfg = from_dict(PrepareConfig, {"source": "hf", "hf": {"path": str(tmp_path / "d")}})
    with pytest.raises(ValueError, match=r"has no column 'caption' \(prepare\.hf\.caption_column\); "
                                         r"its columns: image, sentences$"):
        user_dataset(cfg, tmp_path)


def test_missing_metadata_field_lists_the_fields(tmp_path):
    write_folder(tmp_path / "pics", {"0.png": png(0)}, [{"file_name": "0.png", "caption": "a"}])
    with pytest.raises(ValueError, match=r"metadata\.jsonl has no field 'text' \(prepare\.imagefolder\.caption_column\)"
                                         r"; its fields: caption, file_name$"):
        user_dataset(_cfg(tmp_path / "pics"), tmp_path)


def test_empty_split_lists_the_split_sizes(tmp_path):
    good_folder(tmp_path / "pics/train", range(3))
    write_folder(tmp_path / "pics/validation", {}, [])
    good_folder(tmp_path / "pics/test", range(3, 5))
    with pytest.raises(ValueError, match=r"^split 'val' of image folder .*/pics has no rows \(rows per split: "
                                         r"train=3, val=0, test=2\); add data"):
        user_dataset(_cfg(tmp_path / "pics"), tmp_path)
    dataset_5_captions(2).save_to_disk(str(tmp_path / "two"))  # too small for split_ratios
    with pytest.raises(ValueError, match=r"split 'val' of dataset .*/two has no rows \(rows per split: "
                                         r"train=2, val=0, test=0\)"):
        user_dataset(from_dict(PrepareConfig, {"source": "hf", "hf": {"path": str(tmp_path / "two")}}), tmp_path)
    (tmp_path / "pq").mkdir()  # a parquet directory with an empty split file: datasets refuses it, we name the files
    for name, n in (("train", 3), ("validation", 0), ("test", 2)):
        dataset_5_captions(n).to_parquet(str(tmp_path / "pq" / f"{name}.parquet"))
    with pytest.raises(ValueError, match=r"cannot load dataset .*/pq \(prepare\.hf\.path\): .*\"validation\" "
                                         r"corresponds to no data.*; it holds: test\.parquet, train\.parquet, "
                                         r"validation\.parquet$"):
        user_dataset(from_dict(PrepareConfig, {"source": "hf", "hf": {"path": str(tmp_path / "pq")}}), tmp_path)


def test_split_left_empty_by_skipping_says_so(tmp_path):
    root = folder_with_one_bad(tmp_path, b"", {"text": "x"})
    write_folder(root / "other", {}, [{"file_name": "nothing.png", "text": "x"}])
    cfg = _cfg(root, on_bad_sample="skip", splits={"test": "other"})
    with pytest.raises(ValueError, match=r"split 'test' of image folder .* has no rows left after skipping bad "
                                         r"samples \(\{'empty_file': 1, 'missing_file': 1\}\) \(rows per split: "
                                         r"train=4, val=1, test=0\)"):
        user_dataset(cfg, tmp_path)


def test_empty_dataset_and_folder(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics/metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"split 'train' of image folder .* has no rows \(rows per split: train=0"):
        user_dataset(_cfg(tmp_path / "pics"), tmp_path)
    (tmp_path / "pics/metadata.jsonl").unlink()
    with pytest.raises(ValueError, match=r"has no metadata\.jsonl or metadata\.csv.*\(it holds: nothing\)"):
        user_dataset(_cfg(tmp_path / "pics"), tmp_path)


def test_unknown_split_names_list_the_splits(tmp_path):
    datasets.DatasetDict({"train": dataset_5_captions(3), "dev": dataset_5_captions(2),
                          "test": dataset_5_captions(2)}).save_to_disk(str(tmp_path / "d"))
    cfg = {"source": "hf", "hf": {"path": str(tmp_path / "d")}}
    with pytest.raises(ValueError, match=r"has splits train=3, dev=2, test=2; not found: "
                                         r"prepare\.splits\.val='validation'\. Fix: map"):
        user_dataset(from_dict(PrepareConfig, cfg), tmp_path)
    ds, _ = user_dataset(from_dict(PrepareConfig, {**cfg, "splits": {"val": "dev"}}), tmp_path)
    assert {k: len(v) for k, v in ds.items()} == {"train": 3, "val": 2, "test": 2}


def test_karpathy_split_column_and_max_samples(tmp_path):
    ds = dataset_5_captions(9)
    ds = ds.add_column("split", ["train"] * 5 + ["val"] * 2 + ["test"] * 2)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "d"))  # nlphuji/flickr30k's layout
    cfg = {"source": "hf", "splits": {"val": "val"}, "hf": {"path": str(tmp_path / "d"), "split_column": "split"}}
    out, _ = user_dataset(from_dict(PrepareConfig, cfg), tmp_path)
    assert {k: len(v) for k, v in out.items()} == {"train": 5, "val": 2, "test": 2}
    assert out["val"]["captions"][0] == captions(5)
    out, _ = user_dataset(from_dict(PrepareConfig, {**cfg, "max_samples": 1}), tmp_path)
    assert {k: len(v) for k, v in out.items()} == {"train": 1, "val": 1, "test": 1}


@pytest.mark.parametrize("params,match", [
    ({"split_ratios": [0.8, 0.1, 0.2]}, r"prepare\.split_ratios=\[0\.8, 0\.1, 0\.2\] is invalid: .*summing to 1"),
    ({"split_ratios": [1.0, 0.0, 0.0]}, r"prepare\.split_ratios=.*each > 0"),
    ({"source": "hf"}, r"prepare\.hf\.path='' is invalid: prepare\.source is hf: set it to a hub dataset id"),
    ({"source": "imagefolder"}, r"prepare\.imagefolder\.path='' is invalid"),
    ({"source": "csv"}, r"prepare\.source='csv' is invalid: allowed: synthetic, hf, imagefolder"),
    ({"on_bad_sample": "ignore"}, r"prepare\.on_bad_sample='ignore' is invalid: allowed: error, skip"),
    ({"max_samples": 0}, r"prepare\.max_samples=0 is invalid"),
    ({"hf": {"image_colum": "img"}}, r"unknown key 'prepare\.hf\.image_colum' \(did you mean 'image_column'\?\)"),
])
def test_source_params_are_validated(params, match):
    with pytest.raises(ValueError, match=match):
        from_dict(PrepareConfig, params)


def test_uncached_hub_dataset_fails_fast_with_the_fix(tmp_path):
    cfg = from_dict(PrepareConfig, {"source": "hf", "hf": {"path": "nobody-xyz/no-such-dataset"}})
    with pytest.raises(ValueError, match=r"cannot load dataset 'nobody-xyz/no-such-dataset': not a local path.*"
                                         r"HF_HUB_OFFLINE is set.*Fix: .*HF_HOME.*prepare\.hf\.path"):
        user_dataset(cfg, tmp_path)
