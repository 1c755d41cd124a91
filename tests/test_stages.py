"""Each stage's click command, called with an argv list on tiny params, in order (one pipeline)."""

from __future__ import annotations

import json

import mlflow
import pytest

from conftest import STAGE_ARGS, run_stages
from helpers.tiny_models import tiny_sentence_transformer
from stages import prepare

ARGS = STAGE_ARGS
KEYS = {"R1", "R5", "R10", "mean_rank", "median_rank", "mAP10"}
CAPTION_KEYS = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "distinct"}


@pytest.fixture
def pipeline_dir(tmp_path, tiny_params_file, mlflow_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MMALIGN_TEST_SECRET", "s3cr3t-value")  # must never reach MLflow
    run_stages(tiny_params_file)
    return tmp_path


def test_four_stages_write_their_outputs_and_metrics(pipeline_dir, mlflow_uri):
    d = pipeline_dir
    assert (d / "data/features/fingerprint.json").exists()
    assert (d / "models/builtin/tiny-clip/config.json").exists()
    assert (d / "models/llm/tiny-qwen2/model.safetensors").exists()
    assert (d / "models/aligner/model.safetensors").exists() and (d / "models/projector/model.safetensors").exists()
    report = json.loads((d / "data/prepare_report.json").read_text())
    assert report["splits"]["train"] == {"items": 48, "captions": 48 * 3}

    headline = json.loads((d / "eval/metrics.json").read_text())  # what `dvc exp show` compares
    assert set(headline) == {
        "i2t_R1", "t2i_R1", "chance_i2t_R1", "chance_t2i_R1", "CIDEr", "blind_CIDEr", "distinct",
        "a2t_R1", "t2a_R1", "chance_a2t_R1", "chance_t2a_R1", "t2a_mAP10", "audio_CIDEr", "audio_blind_CIDEr",
        "audio_distinct"}
    metrics = json.loads((d / "eval/metrics_all.json").read_text())["image"]  # every number
    assert headline["CIDEr"] == metrics["captioning"]["trained"]["CIDEr"]
    ret = metrics["retrieval"]
    for direction in ("i2t", "t2i"):
        assert set(ret[direction]) == KEYS and set(ret["chance"][direction]) == KEYS
        assert set(ret["by_dim"]) == {"8", "16", "32"}
        assert set(ret["by_dim"]["8"][direction]) == KEYS
    assert ret["chance"]["t2i"]["R1"] == pytest.approx(1 / 16)
    assert set(metrics["captioning"]["trained"]) == CAPTION_KEYS == set(metrics["captioning"]["blind"])
    by_dim = metrics["captioning"]["by_dim"]  # captions from every MRL dim of one Matryoshka-trained projector
    assert set(by_dim) == {"8", "16", "32"} and all(set(m) == CAPTION_KEYS for m in by_dim.values())
    assert by_dim["32"] == metrics["captioning"]["trained"]
    assert (d / "eval/examples/captions.csv").read_text().count("\n") == 16 + 1
    assert (d / "eval/examples/audio_captions.csv").read_text().count("\n") == 8 + 1
    assert (d / "eval/plots/r1_by_dim.csv").exists() and (d / "eval/plots/cider_by_dim.csv").exists() and (d / "plots/align/loss.csv").exists()

    # One MLflow run per stage, nested under one parent run of the pipeline; evaluate carries all params + figures.
    runs = mlflow.search_runs(experiment_names=["mmalign"], output_format="list")
    (parent,) = [r for r in runs if "mmalign.stage" not in r.data.tags]
    runs = [r for r in runs if r is not parent]
    by_stage = {r.data.tags["mmalign.stage"]: r for r in runs}
    assert set(by_stage) == {"prepare", "prepare_audio", "llm", "align", "project", "evaluate"}
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert len({r.data.tags["mmalign.pipeline"] for r in [parent, *runs]}) == 1
    inputs = {i.tags[0].value: i.dataset for i in by_stage["prepare"].inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test"} and inputs["train"].name == "synthetic"
    ev = by_stage["evaluate"]
    assert ev.data.params["align.d_align"] == "32" and "project.k" in ev.data.params
    # one naming scheme: MLflow's keys are the metrics files' dotted paths
    assert ev.data.metrics["i2t_R1"] == headline["i2t_R1"] == ev.data.metrics["image.retrieval.i2t.R1"]
    client = mlflow.MlflowClient()
    figures = {f.path for f in client.list_artifacts(ev.info.run_id, "figures")}
    assert {"figures/r1_by_dim.png", "figures/caption_gallery.png", "figures/retrieval_examples.png",
            "figures/cider_by_dim.png", "figures/audio_r1_by_dim.png", "figures/audio_caption_gallery.png",
            "figures/audio_retrieval_examples.png", "figures/audio_cider_by_dim.png"} <= figures
    assert ev.data.metrics["a2t_R1"] == headline["a2t_R1"] == ev.data.metrics["audio.retrieval.a2t.R1"]
    for stage in ("align", "project"):  # each training stage draws its own loss curve
        assert [f.path for f in client.list_artifacts(by_stage[stage].info.run_id, "figures")] == [f"figures/{stage}_loss.png"]
    assert any(k.startswith("train/loss") for k in by_stage["align"].data.metrics)
    # project captions 16 fixed val images after each epoch (1 here): a table and their distinct share
    pr = by_stage["project"]
    assert 0 < pr.data.metrics["val/distinct"] <= 1 and 0 < pr.data.metrics["val/audio_distinct"] <= 1
    (table,) = client.list_artifacts(pr.info.run_id, "watch_captions")
    rows = json.loads(open(client.download_artifacts(pr.info.run_id, table.path, str(d))).read())["data"]
    assert [r[1] for r in rows] == ["image"] * 16 + ["audio"] * 8 and all(isinstance(r[3], str) for r in rows)
    assert not client.search_registered_models()  # evaluate logs the captioner; registering is a choice
    check_register()
    for run in runs:  # nothing from the environment is logged
        assert not any("s3cr3t" in str(v) for v in [*run.data.params.values(), *run.data.tags.values()])
    # Weights are safetensors only: nothing that would be unpickled on load.
    assert not [p for p in d.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]


def test_bad_param_fails_before_any_work(tmp_path, tiny_params_file, mlflow_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_params_file.write_text(tiny_params_file.read_text().replace("d_align: 32", "d_algn: 32"))
    with pytest.raises(ValueError, match=r"unknown key 'align.d_algn' \(did you mean 'd_align'\?\)"):
        prepare.main(["--params", str(tiny_params_file), *ARGS["prepare"]], standalone_mode=False)
    assert not (tmp_path / "data").exists()


def test_pipeline_on_local_models_by_path(tmp_path, tiny_params_file, tiny_clip_dir, tiny_chat_llm_dir, mlflow_uri,
                                          monkeypatch):
    """Real-model code path: CLIP vision dir, sentence-transformers dir and a chat Qwen2 dir, all by path."""
    import yaml

    monkeypatch.chdir(tmp_path)
    text_dir = tiny_sentence_transformer(tmp_path / "text")
    params = yaml.safe_load(tiny_params_file.read_text())
    params["models"] = {"vision": str(tiny_clip_dir), "text": str(text_dir), "llm": str(tiny_chat_llm_dir),
                        "trust_remote_code": False}
    params["prepare"]["vision_pooling"] = "cls"
    tiny_params_file.write_text(yaml.safe_dump(params))
    run_stages(tiny_params_file)
    report = json.loads((tmp_path / "data/prepare_report.json").read_text())
    assert report["models"] == {"encoder": str(tiny_clip_dir), "text": str(text_dir)}
    assert json.loads((tmp_path / "models/llm/models.json").read_text()) == {"llm": str(tiny_chat_llm_dir)}
    assert report["text_dim"] == 32 and report["dim"] == 32
    assert not (tmp_path / "models/builtin/tiny-clip").exists() and not (tmp_path / "models/llm/tiny-qwen2").exists()
    metrics = json.loads((tmp_path / "eval/metrics_all.json").read_text())["image"]
    assert set(metrics["captioning"]["trained"]) == CAPTION_KEYS


def check_register() -> None:
    """`mmalign register` on the pipeline's store: the best evaluate run, a description, @champion."""
    from click.testing import CliRunner

    from mmalign.cli import mmalign

    result = CliRunner().invoke(mmalign, ["register"])  # the best evaluate run of experiment mmalign
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "models:/mmalign-captioner@champion"
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("mmalign-captioner", "champion")
    (ev,) = mlflow.search_runs(experiment_names=["mmalign"], filter_string="tags.`mmalign.stage` = 'evaluate'",
                               output_format="list")
    assert str(version.version) == "1" and version.run_id == ev.info.run_id
    assert f"CIDEr {ev.data.metrics['CIDEr']:.3f} (vs {ev.data.metrics['blind_CIDEr']:.3f})" in version.description
    assert "params sha256" in version.description and "synthetic@" in version.description
    assert version.tags["run_id"] == ev.info.run_id
    assert mlflow.models.get_model_info("models:/mmalign-captioner@champion").signature is not None

    again = CliRunner().invoke(mmalign, ["register", ev.info.run_id, "--alias", "staging"])  # by run id
    assert again.exit_code == 0, again.output
    assert str(client.get_model_version_by_alias("mmalign-captioner", "staging").version) == "2"
    missing = CliRunner().invoke(mmalign, ["register", "no-such-experiment"])
    assert missing.exit_code == 1 and "no MLflow experiment named 'no-such-experiment'" in missing.output
