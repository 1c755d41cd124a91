"""Typed, validated configs: one dataclass per `params.yaml` section.

Every field is documented and checked in `__post_init__`; `from_dict` rejects unknown keys
(with a did-you-mean) and wrong types, so a typo in params.yaml fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

BUILTIN_VISION = "builtin:tiny-clip"
BUILTIN_LLM = "builtin:tiny-qwen2"
ACTIVATIONS = ("gelu", "relu", "silu", "tanh")


def _fail(section: str, key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{section}.{key}={value!r} is invalid: {allowed}")


def _check_type(section: str, key: str, value: Any, hint: Any) -> Any:
    """Check `value` against a (simple) type hint; floats as in _check_float."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        if len(args) == 2 and type(None) in args:  # X | None: X's own message says what is wrong
            return _check_type(section, key, value, next(a for a in args if a is not type(None)))
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(section, key, value, arg)
            except ValueError:
                pass
        _fail(section, key, value, f"expected {hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(section, key, value, f"expected a list of {typing.get_args(hint)[0].__name__}")
        (inner,) = typing.get_args(hint)[:1]
        return [_check_type(section, f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            _fail(section, key, value, f"expected a mapping for {hint.__name__}")
        return from_dict(hint, value, f"{section}.{key}")
    if hint is float:
        return _check_float(section, key, value)
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint) and not (
            hint is int and isinstance(value, bool))):
        return value
    _fail(section, key, value, f"expected {getattr(hint, '__name__', hint)}")


def _check_float(section: str, key: str, value: Any) -> float:
    """A finite float from a float, an int, or a string float() parses: YAML 1.1 (PyYAML) reads
    `3e-4` (no dot) as a string, and `.nan`/`.inf` as floats no training step can use."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        _fail(section, key, value, "expected float")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        _fail(section, key, value, "expected float (a number such as 3e-4)")
    if not math.isfinite(number):
        _fail(section, key, value, "expected a finite float (not nan or inf)")
    return number


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def check_keys(data: dict[str, Any], allowed: list[str], section: str) -> None:
    """Raise on the first key not in `allowed`, with a did-you-mean."""
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; allowed keys: {', '.join(allowed)}"
            raise ValueError(f"unknown key '{section}.{key}'{hint}")


def from_dict(cls: type[T], data: dict[str, Any] | None, section: str | None = None,
              exclude: tuple[str, ...] = (), **overrides: Any) -> T:
    """Build dataclass `cls` from a params mapping, rejecting unknown keys and wrong types.

    `exclude` names fields that may not come from this section (they are set by `overrides`).
    """
    section = section or getattr(cls, "SECTION", cls.__name__)
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    check_keys(data, [n for n in field_names(cls) if n not in exclude], section)
    kwargs = {k: _check_type(section, k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs, **overrides)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


@dataclass
class TinyCLIPConfig:
    """Size of the locally built stand-in for the CLIP vision tower (random init, frozen)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    patch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        s = "prepare.tiny_clip"
        _at_least_one(s, self, "hidden_size", "num_layers", "num_heads", "intermediate_size", "patch_size")
        if self.hidden_size % self.num_heads:
            _fail(s, "hidden_size", self.hidden_size, f"must be divisible by num_heads={self.num_heads}")


@dataclass
class TinyLLMSpec:
    """Architecture and pretraining recipe of the tiny LLM; identical specs give identical weights.

    vocab_size: target BPE vocabulary (>= 256 bytes + special tokens); a small corpus may yield fewer.
    hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: Qwen2 shape (GQA:
        num_heads % num_kv_heads == 0; head dim hidden_size / num_heads must be even for RoPE).
    max_position_embeddings: context length; longer captions are truncated in pretraining.
    steps, batch_size, lr: AdamW optimiser steps, sequences per step, peak learning rate (cosine).
    seed: weight init and batch sampling. chat_template: add ChatML tokens + template.
    """

    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    chat_template: bool = False

    def __post_init__(self) -> None:
        # 256 byte tokens + BOS, EOS, PAD (+ <|im_start|>, <|im_end|> with the chat template), see tiny_llm.py
        minimum = {"vocab_size": 256 + (5 if self.chat_template else 3), "max_position_embeddings": 4}
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_position_embeddings", "steps", "batch_size"):
            value, low = getattr(self, name), minimum.get(name, 1)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"TinyLLMSpec.{name} must be an integer >= {low}, got {value!r}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"TinyLLMSpec.hidden_size must be a multiple of num_heads with an even head dim "
                             f"(RoPE), got hidden_size={self.hidden_size}, num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"TinyLLMSpec.num_kv_heads must divide num_heads, "
                             f"got num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"TinyLLMSpec.lr must be in (0, 1), got {self.lr!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"TinyLLMSpec.seed must be an integer in [0, 2**63), got {self.seed!r}")


@dataclass
class ModelsConfig:
    """Which frozen models the pipeline uses: a hub id, a local path, or a `builtin:` stand-in."""

    SECTION = "models"
    vision: str = BUILTIN_VISION  # builtin:tiny-clip | CLIP or SigLIP id or path (e.g. openai/clip-vit-base-patch32)
    text: str = "sentence-transformers/all-MiniLM-L6-v2"  # sentence-transformers id or path
    llm: str = BUILTIN_LLM  # builtin:tiny-qwen2 | causal LM id or path (e.g. Qwen/Qwen2.5-1.5B-Instruct)
    trust_remote_code: bool = False  # passed to from_pretrained; off unless you trust the model repo

    def __post_init__(self) -> None:
        for key in ("vision", "text", "llm"):
            if not getattr(self, key).strip():
                _fail("models", key, getattr(self, key), "must name a model id, a path or a builtin")
        if self.vision.startswith("builtin:") and self.vision != BUILTIN_VISION:
            _fail("models", "vision", self.vision, f"the only builtin vision model is {BUILTIN_VISION}")
        if self.llm.startswith("builtin:") and self.llm != BUILTIN_LLM:
            _fail("models", "llm", self.llm, f"the only builtin LLM is {BUILTIN_LLM}")


SOURCES = ("synthetic", "hf", "imagefolder", "webdataset")


@dataclass
class SplitNames:
    """Which split of the source (or which value of `hf.split_column`) becomes train / val / test."""

    train: str = "train"
    val: str = "validation"
    test: str = "test"


@dataclass
class HFSourceConfig:
    """`prepare.source: hf`: a dataset loaded with `datasets` (Flickr30k / COCO-Karpathy style)."""

    path: str = ""  # hub dataset id, a save_to_disk directory, or a parquet file / directory
    name: str | None = None  # dataset config name (load_dataset's `name`)
    revision: str | None = None  # hub branch, tag or commit
    image_column: str = "image"  # images (datasets.Image) or image file paths
    caption_column: str = "caption"  # a string or a list of strings per row
    id_column: str | None = None  # rows sharing an id are one image (one row per caption); null: row = image
    split_column: str | None = None  # take train/val/test from this column's values (e.g. Karpathy's `split`)

    def __post_init__(self) -> None:
        for key in ("image_column", "caption_column"):
            if not getattr(self, key).strip():
                _fail("prepare.hf", key, getattr(self, key), "must name a column")


@dataclass
class ImageFolderConfig:
    """`prepare.source: imagefolder`: images + metadata.jsonl / metadata.csv (`file_name` + a caption field),
    the Hugging Face imagefolder layout; split subfolders (train/, validation/, test/) each with their own
    metadata file, or one metadata file at the top (divided by `prepare.split_ratios`)."""

    path: str = ""
    caption_column: str = "text"  # metadata field with one caption or a list; several rows per file_name add up


@dataclass
class WebDatasetConfig:
    """`prepare.source: webdataset`: img2dataset / WebDataset `.tar` shards (CC3M, CC12M, LAION-style);
    the sidecar .parquet / _stats.json files are ignored. One split, divided by `prepare.split_ratios`."""

    path: str = ""  # a shard folder, one .tar, a glob (shards/*.tar) or a brace pattern (shards/{00000..00331}.tar)
    image_ext: str = "jpg;png;webp"  # member extensions that hold the image, `;`-separated (the first found is used)
    caption_ext: str = "txt"  # member extension that holds the caption

    def __post_init__(self) -> None:
        if not self.image_exts or not self.caption_ext.strip(". "):
            _fail("prepare.webdataset", "image_ext/caption_ext", (self.image_ext, self.caption_ext),
                  "name member extensions, e.g. image_ext: jpg;png and caption_ext: txt")

    @property
    def image_exts(self) -> list[str]:
        return [e.strip(". ").lower() for e in self.image_ext.split(";") if e.strip(". ")]


@dataclass
class PrepareConfig:
    """Dataset (synthetic, a `datasets` dataset, or an image folder) and frozen-feature extraction."""

    SECTION = "prepare"
    source: str = "synthetic"  # synthetic | hf | imagefolder
    seed: int = 0  # synthetic data; the shuffle before a ratio split
    n_train: int = 3000  # n_*, captions_per_image, max_objects: synthetic only
    n_val: int = 300
    n_test: int = 300
    image_size: int = 64  # synthetic images and the builtin tiny CLIP's input size
    captions_per_image: int = 3
    max_objects: int = 4
    on_bad_sample: str = "error"  # hf/imagefolder: error stops at the first bad sample | skip drops and counts it
    splits: SplitNames = field(default_factory=SplitNames)
    split_ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # [train, val, test], one-split sources
    max_samples: int | None = None  # at most this many images per split (hf/imagefolder); null: all
    hf: HFSourceConfig = field(default_factory=HFSourceConfig)
    imagefolder: ImageFolderConfig = field(default_factory=ImageFolderConfig)
    webdataset: WebDatasetConfig = field(default_factory=WebDatasetConfig)
    vision_pooling: str = "grid"  # cls | mean | grid: how the vision tower's tokens become one feature
    vision_grid: int = 4  # grid side for vision_pooling=grid
    batch_size: int = 128  # feature-extraction batch size
    feature_dtype: str = "float32"  # float32 | float16: the feature cache's dtype (float16 halves its disk and I/O)
    num_workers: int = 0  # workers decoding/checking images (hf/imagefolder) and preprocessing them for extraction
    tiny_clip: TinyCLIPConfig = field(default_factory=TinyCLIPConfig)
    tiny_llm: TinyLLMSpec = field(default_factory=TinyLLMSpec)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            _fail("prepare", "source", self.source, f"allowed: {', '.join(SOURCES)}")
        if self.source != "synthetic" and not getattr(self, self.source).path.strip():
            _fail("prepare", f"{self.source}.path", getattr(self, self.source).path,
                  f"prepare.source is {self.source}: set it to " + {
                      "hf": "a hub dataset id, a save_to_disk directory or a parquet file/directory",
                      "imagefolder": "a folder with images and metadata.jsonl or metadata.csv",
                      "webdataset": "a folder, glob or brace pattern of .tar shards"}[self.source])
        if self.on_bad_sample not in ("error", "skip"):
            _fail("prepare", "on_bad_sample", self.on_bad_sample, "allowed: error, skip")
        r = self.split_ratios
        if len(r) != 3 or min(r) <= 0 or not math.isclose(sum(r), 1.0, abs_tol=1e-6):
            _fail("prepare", "split_ratios", r, "need 3 shares [train, val, test], each > 0, summing to 1")
        if self.max_samples is not None and self.max_samples < 1:
            _fail("prepare", "max_samples", self.max_samples, "must be >= 1, or null for all")
        for key in ("n_train", "n_val", "n_test"):
            if getattr(self, key) < 1:
                _fail("prepare", key, getattr(self, key), "must be >= 1")
        if self.feature_dtype not in ("float32", "float16"):
            _fail("prepare", "feature_dtype", self.feature_dtype, "allowed: float32, float16")
        if self.vision_pooling not in ("cls", "mean", "grid"):
            _fail("prepare", "vision_pooling", self.vision_pooling, "allowed: cls, mean, grid")
        if self.vision_grid < 1:
            _fail("prepare", "vision_grid", self.vision_grid, "must be >= 1")
        if self.batch_size < 1:
            _fail("prepare", "batch_size", self.batch_size, "must be >= 1")
        if self.num_workers < 0:
            _fail("prepare", "num_workers", self.num_workers, "must be >= 0")


@dataclass
class AlignmentConfig:
    """Phase 1: MLP adapters from frozen encoders into a shared space of size `d_align`.

    Also the seed's Quick Start config: `vision_model_name`/`text_model_name` name the frozen
    encoders; `vision_dim`/`text_dim` are filled in from the encoders (or the feature cache).
    """

    SECTION = "align"
    vision_model_name: str = "openai/clip-vit-base-patch32"
    text_model_name: str = "sentence-transformers/all-MiniLM-L6-v2"
    vision_dim: int | None = None
    text_dim: int | None = None
    vision_pooling: str = "cls"  # how vision features were pooled (see FrozenVisionEncoder)
    vision_grid: int = 4
    d_align: int = 512
    hidden_dim: int = 1024  # adapter hidden width
    depth: int = 2  # linear layers per adapter (1 = a single linear map)
    dropout: float = 0.1
    activation: str = "gelu"
    mrl_dims: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    mrl_weights: list[float] | None = None  # one per mrl dim; None = equal weights
    clip_weight: float = 1.0
    mrl_weight: float = 1.0
    logit_scale_init: float = 1 / 0.07  # CLIP's initial temperature
    logit_scale_max: float = 100.0  # clamp, as CLIP does
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    num_epochs: int = 3
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 42
    resume: str = "auto"  # auto: a killed run resumes from its saved training state | never
    state_every: int = 50  # steps between training-state snapshots
    mixed_precision: str = "none"  # none | bf16 (autocast; weights and the loss stay float32)
    device: str = "cpu"

    def __post_init__(self) -> None:
        s = "align"
        _at_least_one(s, self, "d_align", "depth", "hidden_dim")
        if not 0.0 <= self.dropout < 1.0:
            _fail(s, "dropout", self.dropout, "must be in [0, 1)")
        if self.activation not in ACTIVATIONS:
            _fail(s, "activation", self.activation, f"allowed: {', '.join(ACTIVATIONS)}")
        dims = list(self.mrl_dims)
        if not dims or dims != sorted(set(dims)) or dims[0] < 1 or dims[-1] > self.d_align:
            _fail(s, "mrl_dims", dims, f"must be strictly ascending, each in 1..d_align={self.d_align}")
        if self.mrl_weights is not None and (
                len(self.mrl_weights) != len(dims) or any(w < 0 for w in self.mrl_weights)):
            _fail(s, "mrl_weights", self.mrl_weights, f"need {len(dims)} non-negative weights (one per mrl dim)")
        if self.clip_weight < 0 or self.mrl_weight < 0 or self.clip_weight + self.mrl_weight == 0:
            _fail(s, "clip_weight/mrl_weight", (self.clip_weight, self.mrl_weight),
                  "must be >= 0 and not both 0")
        if not 1.0 <= self.logit_scale_init <= self.logit_scale_max:
            _fail(s, "logit_scale_init", self.logit_scale_init, f"must be in [1, logit_scale_max={self.logit_scale_max}]")
        if self.batch_size < 2:
            _fail(s, "batch_size", self.batch_size, "must be >= 2 (a contrastive loss needs negatives)")
        _check_training(s, self)


def _at_least_one(section: str, cfg: Any, *keys: str) -> None:
    for key in keys:
        if getattr(cfg, key) < 1:
            _fail(section, key, getattr(cfg, key), "must be >= 1")


def _check_training(section: str, cfg: Any) -> None:
    """Checks shared by both training sections (align, project)."""
    if cfg.lr <= 0:
        _fail(section, "lr", cfg.lr, "must be > 0")
    if cfg.weight_decay < 0:
        _fail(section, "weight_decay", cfg.weight_decay, "must be >= 0")
    _at_least_one(section, cfg, "batch_size", "num_epochs", "state_every")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        _fail(section, "warmup_ratio", cfg.warmup_ratio, "must be in [0, 1)")
    if cfg.grad_clip <= 0:
        _fail(section, "grad_clip", cfg.grad_clip, "must be > 0")
    if cfg.resume not in ("auto", "never"):
        _fail(section, "resume", cfg.resume, "allowed: auto, never")
    if cfg.mixed_precision not in ("none", "bf16"):
        _fail(section, "mixed_precision", cfg.mixed_precision, "allowed: none, bf16")


@dataclass
class LoRAConfig:
    """Optional LoRA on the LLM (peft). r=0 disables it."""

    r: int = 0
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self) -> None:
        if self.r < 0:
            _fail("project.lora", "r", self.r, "must be >= 0 (0 disables LoRA)")
        if not 0.0 <= self.dropout < 1.0:
            _fail("project.lora", "dropout", self.dropout, "must be in [0, 1)")


@dataclass
class LLMConfig:
    """Phase 2: the decoder LLM and the vision-to-LLM projector that feeds it prefix tokens."""

    SECTION = "project"
    model_name: str = "Qwen/Qwen2.5-1.5B-Instruct"
    k: int = 10  # number of prefix tokens per image (ClipCap uses 10)
    projector_type: str = "mlp"  # mlp (ClipCap/LLaVA-1.5) | linear (LLaVA-1)
    projector_hidden: int = 1024
    freeze_llm: bool = True
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    prompt: str = "Describe this image:"
    max_caption_tokens: int = 64
    trust_remote_code: bool = False
    dtype: str = "float32"  # float32 | bfloat16 | float16
    matryoshka: bool = False  # train the projector on nested prefixes z[:, :d] of every align.mrl_dims d

    def __post_init__(self) -> None:
        s = "project"
        if self.k < 1:
            _fail(s, "k", self.k, "must be >= 1 prefix token")
        if self.projector_type not in ("mlp", "linear"):
            _fail(s, "projector_type", self.projector_type, "allowed: mlp, linear")
        if self.projector_hidden < 1:
            _fail(s, "projector_hidden", self.projector_hidden, "must be >= 1")
        if self.max_caption_tokens < 2:
            _fail(s, "max_caption_tokens", self.max_caption_tokens, "must be >= 2")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            _fail(s, "dtype", self.dtype, "allowed: float32, bfloat16, float16")
        if not self.freeze_llm and self.lora.r == 0:
            _fail(s, "freeze_llm", self.freeze_llm,
                  "full LLM fine-tuning is not supported; set project.lora.r > 0 to train LoRA adapters")


@dataclass
class ProjectTrainConfig:
    """Phase 2 training loop (the `project` section minus the model fields in LLMConfig)."""

    lr: float = 5e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    num_epochs: int = 5
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    resume: str = "auto"  # auto: a killed run resumes from its saved training state | never
    state_every: int = 50  # steps between training-state snapshots
    mixed_precision: str = "none"  # none | bf16 (autocast; weights and the loss stay float32)
    group_by_length: bool = True  # batches of similar caption lengths (within the seeded shuffle): less padding
    watch_images: int = 16  # val images captioned after each epoch (MLflow table + val/distinct); 0: none

    def __post_init__(self) -> None:
        _check_training("project", self)
        if self.watch_images < 0:
            _fail("project", "watch_images", self.watch_images, "must be >= 0 (0 captions none)")


@dataclass
class EvaluateConfig:
    SECTION = "evaluate"
    batch_size: int = 64  # generation batch size
    max_new_tokens: int = 48
    num_beams: int = 1
    blind_prefix: str = "mean"  # mean | zero: what the blind captioner gets instead of an image
    gallery_size: int = 12
    captioning: bool = True  # False skips Phase 2 metrics (retrieval only)
    register_name: str | None = "mmalign-captioner"  # register the captioner in MLflow under this name; null: don't

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            _fail("evaluate", "batch_size", self.batch_size, "must be >= 1")
        if self.max_new_tokens < 1:
            _fail("evaluate", "max_new_tokens", self.max_new_tokens, "must be >= 1")
        if self.num_beams < 1:
            _fail("evaluate", "num_beams", self.num_beams, "must be >= 1")
        if self.blind_prefix not in ("mean", "zero"):
            _fail("evaluate", "blind_prefix", self.blind_prefix, "allowed: mean, zero")
        if self.gallery_size < 0:
            _fail("evaluate", "gallery_size", self.gallery_size, "must be >= 0")
        if self.register_name is not None and not self.register_name.strip():
            _fail("evaluate", "register_name", self.register_name, "a model name, or null to not register")


@dataclass
class TrackingConfig:
    SECTION = "tracking"
    experiment: str = "mmalign"
    required: bool = True  # False: a tracking failure warns once and the stage runs untracked

    def __post_init__(self) -> None:
        if not self.experiment.strip():
            _fail("tracking", "experiment", self.experiment, "must be a non-empty name")


def load_project(section: dict[str, Any] | None, model_name: str, trust_remote_code: bool = False
                 ) -> tuple[LLMConfig, ProjectTrainConfig]:
    """The `project` params section holds both the model (LLMConfig) and the training loop."""
    section = dict(section or {})
    model_keys = [n for n in field_names(LLMConfig) if n not in ("model_name", "trust_remote_code")]
    train_keys = field_names(ProjectTrainConfig)
    check_keys(section, model_keys + train_keys, "project")
    llm = from_dict(LLMConfig, {k: v for k, v in section.items() if k in model_keys}, "project",
                    model_name=model_name, trust_remote_code=trust_remote_code)
    train = from_dict(ProjectTrainConfig, {k: v for k, v in section.items() if k in train_keys}, "project")
    return llm, train
