"""params.yaml validation: unknown keys, wrong types and out-of-range values fail with the key named."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from mmalign.config import (AlignerConfig, AlignmentConfig, AlignTrainConfig, LLMConfig, PrepareConfig,
                            ProjectConfig, ProjectTrainConfig, TrainingConfig, from_dict, part)
from mmalign.params import align_config, load_params, project_config, validate_all

ROOT = Path(__file__).resolve().parents[1]


def _align(**kw) -> AlignmentConfig:
    return from_dict(AlignmentConfig, kw)


def load_project(section: dict, model_name: str = "some/model") -> ProjectConfig:
    return project_config({"project": section}, model_name)


def test_repo_params_yaml_validates_cleanly():
    params = load_params(ROOT / "params.yaml")
    validate_all(params)
    cfg = align_config(params)
    assert cfg.mrl_dims[-1] == cfg.d_align == params["align"]["d_align"]


def test_unknown_key_has_did_you_mean():
    with pytest.raises(ValueError, match=r"unknown key 'align\.lrr' \(did you mean 'lr'\?\)"):
        _align(lrr=0.1)
    with pytest.raises(ValueError, match=r"'align\.mrl_dim'.*did you mean 'mrl_dims'"):
        _align(mrl_dim=[8])
    with pytest.raises(ValueError, match=r"unknown key 'align\.zzz'; allowed keys: .*d_align"):
        _align(zzz=1)


def test_unknown_nested_key_names_the_full_path():
    with pytest.raises(ValueError, match=r"prepare\.tiny_clip\.hidden_sise.*did you mean 'hidden_size'"):
        from_dict(PrepareConfig, {"tiny_clip": {"hidden_sise": 32}})


def test_unknown_top_level_section(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"algin": {"lr": 0.1}}))
    with pytest.raises(ValueError, match=r"'params\.yaml\.algin'.*did you mean 'align'"):
        load_params(p)


def test_derived_align_fields_are_not_accepted_from_params():
    with pytest.raises(ValueError, match=r"unknown key 'align\.vision_dim'"):
        align_config({"align": {"vision_dim": 10}})


@pytest.mark.parametrize("key,value", [
    ("lr", "fast"),
    ("batch_size", "32"),
    ("batch_size", True),
    ("batch_size", 32.0),
    ("num_epochs", False),
    ("mrl_dims", "8,16"),
    ("mrl_dims", [8, "16"]),
    ("dropout", "abc"),
    ("dropout", [0.1]),
    ("mrl_weights", 1.0),
])
def test_wrong_types_are_rejected_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"align\.{re.escape(key)}(\[\d+\])?=.*is invalid: expected"):
        _align(**{key: value})


def test_int_is_accepted_where_float_is_expected():
    cfg = _align(lr=1, dropout=0, clip_weight=2)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and isinstance(cfg.clip_weight, float)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "inf", "-inf", "1e999"])
@pytest.mark.parametrize("key", ["lr", "dropout", "clip_weight", "mrl_weights"])
def test_nan_and_inf_are_rejected_for_float_params(key, value):
    value = [value, 1.0] if key == "mrl_weights" else value
    with pytest.raises(ValueError, match=rf"^align\.{key}(\[0\])?=.*is invalid: expected a finite float"):
        _align(**{key: value, "d_align": 32, "mrl_dims": [8, 32]})


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", ".NaN", "-.Inf"])
def test_yaml_nan_and_inf_fail_validation_in_every_float_section(text):
    params = load_params(ROOT / "params.yaml")
    for section in ("align", "project"):
        bad = {**params, section: {**params[section], "lr": yaml.safe_load(f"lr: {text}")["lr"]}}
        with pytest.raises(ValueError, match=rf"^{section}\.lr=.*is invalid: expected a finite float"):
            validate_all(bad)


@pytest.mark.parametrize("text,want", [("3e-4", 3e-4), ("1e9", 1e9), ("1.0e+9", 1e9), ("0.25", 0.25)])
def test_yaml_strings_that_parse_as_floats_are_accepted(text, want):
    lr = yaml.safe_load(f"lr: {text}")["lr"]
    cfg = _align(lr=lr) if want < 1 else _align(clip_weight=lr)
    assert (cfg.lr if want < 1 else cfg.clip_weight) == want


@pytest.mark.parametrize("kw,key", [
    ({"lr": 0.0}, "lr"),
    ({"lr": -1e-3}, "lr"),
    ({"batch_size": 1}, "batch_size"),
    ({"d_align": 32, "mrl_dims": [16, 8, 32]}, "mrl_dims"),
    ({"d_align": 32, "mrl_dims": [8, 8, 32]}, "mrl_dims"),
    ({"d_align": 32, "mrl_dims": [8, 64]}, "mrl_dims"),
    ({"d_align": 32, "mrl_dims": []}, "mrl_dims"),
    ({"dropout": 1.0}, "dropout"),
    ({"dropout": -0.1}, "dropout"),
    ({"d_align": 32, "mrl_dims": [8, 32], "mrl_weights": [1.0]}, "mrl_weights"),
    ({"logit_scale_init": 200.0}, "logit_scale_init"),
    ({"num_epochs": 0}, "num_epochs"),
    ({"activation": "swish"}, "activation"),
])
def test_out_of_range_align_values_name_the_key(kw, key):
    with pytest.raises(ValueError, match=rf"align\.{key}="):
        _align(**kw)


@pytest.mark.parametrize("section,key", [
    ({"k": 0}, "project.k"),
    ({"lr": 0}, "project.lr"),
    ({"projector_type": "perceiver"}, "project.projector_type"),
    ({"lora": {"dropout": 1.0}}, "project.lora.dropout"),
    ({"batch_size": "64"}, "project.batch_size"),
])
def test_project_section_errors_name_the_key(section, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        load_project(section, "some/model")


def test_project_section_is_the_model_and_its_training():
    cfg = load_project({"k": 3, "lr": 0.01, "lora": {"r": 4}})
    assert isinstance(cfg, LLMConfig) and isinstance(cfg, ProjectTrainConfig)
    llm = part(cfg, LLMConfig)
    assert type(llm) is LLMConfig and llm.k == 3 and llm.lora.r == 4 and llm.model_name == "some/model"
    assert cfg.lr == 0.01
    with pytest.raises(ValueError, match=r"project\.kk.*did you mean 'k'"):
        load_project({"kk": 3})
    with pytest.raises(ValueError, match=r"unknown key 'project\.model_name'"):  # the llm stage names the LLM
        load_project({"model_name": "x"})


def test_validate_all_catches_an_error_in_any_section():
    params = load_params(ROOT / "params.yaml")
    params["evaluate"] = {**params["evaluate"], "num_beams": 0}
    with pytest.raises(ValueError, match=r"evaluate\.num_beams"):
        validate_all(params)


# Incompatible combinations: each names the keys involved and the way out.
def test_full_llm_finetuning_without_lora_is_refused():
    with pytest.raises(ValueError, match=r"project\.freeze_llm=False.*project\.lora\.r > 0"):
        load_project({"freeze_llm": False}, "m")


def test_mrl_weights_must_match_mrl_dims():
    with pytest.raises(ValueError, match=r"align\.mrl_weights=\[1\.0\].*need 2 non-negative weights"):
        from_dict(AlignmentConfig, {"d_align": 16, "mrl_dims": [8, 16], "mrl_weights": [1.0]})


def test_captioning_without_a_projector_is_refused(tmp_path):
    from mmalign.config import EvaluateConfig
    from mmalign.pipeline import evaluate

    with pytest.raises(ValueError, match=r"evaluate\.captioning is true but no projector.*captioning: false"):
        evaluate.run(EvaluateConfig(), tmp_path, tmp_path, tmp_path, tracker=None)


@pytest.mark.parametrize("text,want", [("3e-4", 3e-4), ("1e9", 1e9), ("1.0e+9", 1e9)])
def test_numbers_as_users_write_them_parse_from_params_yaml(tmp_path, text, want):
    """YAML 1.1 (PyYAML) reads `3e-4` and `1e9` as strings; they are floats all the same."""
    params = load_params(ROOT / "params.yaml")
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params).replace("lr: 0.001\n", f"lr: {text}\n", 1)
                 .replace("lr: 0.005\n", f"lr: {text}\n", 1))
    loaded = load_params(p)
    assert isinstance(loaded["align"]["lr"], str) or text == "1.0e+9"  # what PyYAML hands over
    validate_all(loaded)
    assert align_config(loaded).lr == want and project_config(loaded).lr == want


@pytest.mark.parametrize("cls,section", [(AlignmentConfig, "align"), (ProjectTrainConfig, "project")])
def test_a_bool_is_not_a_number(cls, section):
    for key in ("batch_size", "lr"):
        with pytest.raises(ValueError, match=rf"^{section}\.{key}=True is invalid: expected"):
            cls(**{key: True})


def _present(values: dict, like: dict) -> dict:
    """`values` restricted to the keys of `like`, nested mappings too."""
    return {k: _present(v, like[k]) if isinstance(v, dict) else v for k, v in values.items() if k in like}


def test_defaults_are_params_yaml():
    """A config built in Python (the Quick Start, a test) trains as `dvc repro` does on the defaults."""
    from mmalign.config import EvaluateConfig, ModelsConfig, TrackingConfig

    params = load_params(ROOT / "params.yaml")
    # The one exception: the offline model preset gives the stand-in LLM LoRA (conf/model/offline.yaml says why);
    # Python's default, like the real preset, keeps the LLM frozen.
    standin = yaml.safe_load((ROOT / "conf/model/offline.yaml").read_text())["project"]
    assert set(standin) == {"freeze_llm", "lora"} and all(params["project"][k] == v for k, v in standin.items())
    params["project"] |= {"freeze_llm": True, "lora": dataclasses.asdict(LLMConfig().lora)}
    defaults = {"models": ModelsConfig(), "prepare": PrepareConfig(), "align": AlignmentConfig(),
                "project": ProjectConfig(), "evaluate": EvaluateConfig(), "tracking": TrackingConfig()}
    for section, cfg in defaults.items():
        assert _present(dataclasses.asdict(cfg), params[section]) == params[section], section


def test_training_fields_are_declared_once_and_shared():
    shared = [f.name for f in dataclasses.fields(TrainingConfig)]
    assert len(shared) == 10
    for cls in (AlignTrainConfig, ProjectTrainConfig, AlignmentConfig, ProjectConfig):
        assert issubclass(cls, TrainingConfig) and set(shared) <= {f.name for f in dataclasses.fields(cls)}
    model = {f.name for f in dataclasses.fields(AlignerConfig)} | {f.name for f in dataclasses.fields(LLMConfig)}
    assert not model & set(shared) and "device" not in model


def test_importing_config_loads_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = "import sys, mmalign.config, mmalign.params; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
