"""Typed, validated configs: one pydantic dataclass per `params.yaml` section, configs by role.

Types, ranges, enums and unknown keys are pydantic's; cross-field checks are validators; an error is one
ValueError line naming the full key and what is allowed (validation.py: the dialect).

    TrainingConfig                  the loop both phases run (train.fit): lr, batch_size, seed, ...
      AlignTrainConfig              + the Phase 1 loss weights
      ProjectTrainConfig            + the Phase 2 batching and caption watch
    AlignerConfig, LLMConfig        the models: exactly what their from_pretrained reads (config.json)
    AlignmentConfig, ProjectConfig  the `align` / `project` sections: model + training, flat

The runtime device is no config: it is an argument (`VisionTextAligner(cfg, device=...)`, `.to()`).
Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import Field, model_validator

from .validation import (Bool, Float, Fraction, Int, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                         Str, config, fail, heads_divide)
from .validation import fields_of, from_dict, part, unknown_key  # noqa: F401 (re-exported for config's users)

# -- vocabularies: each listed here once; the modules that act on them import them ---------------------
BUILTIN_VISION = "builtin:tiny-clip"
BUILTIN_AUDIO = "builtin:tiny-whisper"
BUILTIN_LLM = "builtin:tiny-qwen2"
# The modalities paired with text, in the order every stage handles them (modalities.py: what each one is).
MODALITIES: tuple[str, ...] = ("image", "audio")
ACTIVATIONS = {"gelu": "GELU", "relu": "ReLU", "silu": "SiLU", "tanh": "Tanh"}  # name -> its torch.nn module
Activation = Literal[tuple(ACTIVATIONS)]  # type: ignore[valid-type]
VisionPooling = Literal["cls", "mean", "grid"]
AudioPooling = Literal["mean", "grid", "pooler"]  # Whisper: mean | grid over the frames holding audio; CLAP: pooler
DType = Literal["float32", "bfloat16", "float16"]  # torch's names (utils.DTYPES)
Source = Literal["synthetic", "hf", "imagefolder", "webdataset"]
AudioSource = Literal["synthetic", "hf", "audiofolder"]
VISION_POOLINGS: tuple[str, ...] = get_args(VisionPooling)
DTYPES: tuple[str, ...] = get_args(DType)
SOURCES: tuple[str, ...] = get_args(Source)


# -- models and data: the prepare and llm stages ---------------------------------------------------------
@config("prepare.tiny_clip")
class TinyCLIPConfig:
    """Size of the locally built stand-in for the CLIP vision tower (random init, frozen)."""

    hidden_size: PositiveInt = 128
    num_layers: PositiveInt = 4
    num_heads: PositiveInt = 4
    intermediate_size: PositiveInt = 512
    patch_size: PositiveInt = 8
    seed: Int = 0

    _heads = model_validator(mode="after")(heads_divide("hidden_size"))


@config("prepare.audio.tiny_whisper")
class TinyWhisperConfig:
    """Size of the locally built stand-in for a Whisper encoder (random init, frozen; standins/tiny_whisper.py).

    d_model, num_layers, num_heads, ffn_dim: encoder shape (d_model % num_heads == 0).
    num_mel_bins: log-mel channels (80 as whisper-base). chunk_length: window in seconds; the
    encoder then has chunk_length * 50 positions (20 ms each), so 5 s keeps CPU extraction fast.
    init_std: std of the random weights (transformers' WhisperConfig.init_std).
    seed: torch seed of the random init; equal configs give equal weights.

    Why no transformer layer and init_std 0.3 (Whisper's own init is 0.02): at 0.02 the random convolutions'
    output is small beside the sinusoidal position embedding, so pooled features mostly say which frames
    were pooled (the clip length); each random attention layer then mixes frames from all over the clip.
    benchmarks/bench_audio_pooling.py (nearest-neighbour first-event accuracy, chance 0.20): 4 layers at 0.02
    give 0.24-0.28, 1 layer at 0.3 gives 0.40 (mean) to 0.51 (grid). Trained end to end (align on the default
    audio alone, test R@1 a2t / t2a, 2026-11-28): 1 layer grid 4 0.196 / 0.205, grid 8 0.247 / 0.215,
    0 layers grid 4 0.263 / 0.277, grid 8 0.255 / 0.223, d_model 256 0.214 / 0.273. So the stand-in is
    Whisper's convolutional front end alone (WhisperEncoder with encoder_layers=0: the same class and
    files), which is also several times faster to run.
    """

    d_model: PositiveInt = 128
    num_layers: NonNegativeInt = 0  # 0: the convolutional front end alone (+ positions, final LayerNorm)
    num_heads: PositiveInt = 4
    ffn_dim: PositiveInt = 512
    num_mel_bins: PositiveInt = 80
    chunk_length: PositiveInt = 5
    init_std: PositiveFloat = 0.3
    seed: Int = 0

    _heads = model_validator(mode="after")(heads_divide("d_model"))


@config("prepare.tiny_llm")
class TinyLLMSpec:
    """Architecture and pretraining recipe of the tiny LLM; identical specs give identical weights.

    vocab_size: target BPE vocabulary (>= 256 bytes + special tokens); a small corpus may yield fewer.
    hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: Qwen2 shape (GQA:
        num_heads % num_kv_heads == 0; head dim hidden_size / num_heads must be even for RoPE).
    max_position_embeddings: context length; longer captions are truncated in pretraining.
    steps, batch_size, lr: AdamW optimiser steps, sequences per step, peak learning rate (cosine).
    seed: weight init and batch sampling. chat_template: add ChatML tokens + template.
    """

    vocab_size: PositiveInt = 1024
    hidden_size: PositiveInt = 128
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 4
    num_kv_heads: PositiveInt = 2
    intermediate_size: PositiveInt = 384
    max_position_embeddings: Annotated[Int, Field(ge=4)] = 256
    steps: PositiveInt = 300
    batch_size: PositiveInt = 64
    lr: Annotated[Float, Field(gt=0, lt=1)] = 3e-3
    seed: Annotated[Int, Field(ge=0, lt=2**63)] = 0
    chat_template: Bool = False

    @model_validator(mode="after")
    def _shape(self) -> TinyLLMSpec:
        # 256 byte tokens + BOS, EOS, PAD (+ <|im_start|>, <|im_end|> with the chat template), see tiny_llm.py
        if self.vocab_size < (low := 256 + (5 if self.chat_template else 3)):
            fail("vocab_size", self.vocab_size, f"must be >= {low} (256 bytes + the special tokens)")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            fail("hidden_size", self.hidden_size,
                  f"must be a multiple of num_heads={self.num_heads} with an even head dim (RoPE)")
        if self.num_heads % self.num_kv_heads:
            fail("num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads}")
        return self


@config("modalities")
class ModalitiesConfig:
    """Which modalities the pipeline carries, each paired with its captions (text). A modality that is off
    is skipped by every stage (its prepare stage writes an empty marker), so toggling one re-runs only
    what it feeds; each modality's prepare stage reads only its own switch."""

    image: Bool = True
    audio: Bool = True

    @model_validator(mode="after")
    def _some(self) -> ModalitiesConfig:
        if not self.enabled:
            fail("image/audio", (self.image, self.audio), "turn at least one modality on")
        return self

    @property
    def enabled(self) -> list[str]:
        return [m for m in MODALITIES if getattr(self, m)]


@config("models")
class ModelsConfig:
    """Which frozen models the pipeline uses: a hub id, a local path, or a `builtin:` stand-in."""

    vision: Str = BUILTIN_VISION  # builtin:tiny-clip | CLIP or SigLIP id or path (e.g. openai/clip-vit-base-patch32)
    audio: Str = BUILTIN_AUDIO  # builtin:tiny-whisper | Whisper or CLAP id or path (e.g. openai/whisper-base)
    text: Str = "sentence-transformers/all-MiniLM-L6-v2"  # sentence-transformers id or path
    llm: Str = BUILTIN_LLM  # builtin:tiny-qwen2 | causal LM id or path (e.g. Qwen/Qwen2.5-1.5B-Instruct)
    trust_remote_code: Bool = False  # passed to from_pretrained; off unless you trust the model repo

    @model_validator(mode="after")
    def _names(self) -> ModelsConfig:
        for key in ("vision", "audio", "text", "llm"):
            if not getattr(self, key).strip():
                fail(key, getattr(self, key), "must name a model id, a path or a builtin")
        if self.vision.startswith("builtin:") and self.vision != BUILTIN_VISION:
            fail("vision", self.vision, f"the only builtin vision model is {BUILTIN_VISION}")
        if self.audio.startswith("builtin:") and self.audio != BUILTIN_AUDIO:
            fail("audio", self.audio, f"the only builtin audio model is {BUILTIN_AUDIO}")
        if self.llm.startswith("builtin:") and self.llm != BUILTIN_LLM:
            fail("llm", self.llm, f"the only builtin LLM is {BUILTIN_LLM}")
        return self


@config("prepare.splits")
class SplitNames:
    """Which split of the source (or which value of `hf.split_column`) becomes train / val / test."""

    train: Str = "train"
    val: Str = "validation"
    test: Str = "test"


@config("prepare.hf")
class HFSourceConfig:
    """`prepare.source: hf`: a dataset loaded with `datasets` (Flickr30k / COCO-Karpathy style)."""

    path: Str = ""  # hub dataset id, a save_to_disk directory, or a parquet file / directory
    name: Str | None = None  # dataset config name (load_dataset's `name`)
    revision: Str | None = None  # hub branch, tag or commit
    image_column: Str = "image"  # images (datasets.Image) or image file paths
    caption_column: Str = "caption"  # a string or a list of strings per row
    id_column: Str | None = None  # rows sharing an id are one image (one row per caption); null: row = image
    split_column: Str | None = None  # take train/val/test from this column's values (e.g. Karpathy's `split`)

    @model_validator(mode="after")
    def _columns(self) -> HFSourceConfig:
        for key in ("image_column", "caption_column"):
            if not getattr(self, key).strip():
                fail(key, getattr(self, key), "must name a column")
        return self


@config("prepare.imagefolder")
class ImageFolderConfig:
    """`prepare.source: imagefolder`: images + metadata.jsonl / metadata.csv (`file_name` + a caption field),
    the Hugging Face imagefolder layout; split subfolders (train/, validation/, test/) each with their own
    metadata file, or one metadata file at the top (divided by `prepare.split_ratios`)."""

    path: Str = ""
    caption_column: Str = "text"  # metadata field with one caption or a list; several rows per file_name add up


@config("prepare.webdataset")
class WebDatasetConfig:
    """`prepare.source: webdataset`: img2dataset / WebDataset `.tar` shards (CC3M, CC12M, LAION-style);
    the sidecar .parquet / _stats.json files are ignored. One split, divided by `prepare.split_ratios`."""

    path: Str = ""  # a shard folder, one .tar, a glob (shards/*.tar) or a brace pattern (shards/{00000..00331}.tar)
    image_ext: Str = "jpg;png;webp"  # member extensions that hold the image, `;`-separated (the first found is used)
    caption_ext: Str = "txt"  # member extension that holds the caption

    @model_validator(mode="after")
    def _extensions(self) -> WebDatasetConfig:
        if not self.image_exts or not self.caption_ext.strip(". "):
            fail("image_ext/caption_ext", (self.image_ext, self.caption_ext),
                  "name member extensions, e.g. image_ext: jpg;png and caption_ext: txt")
        return self

    @property
    def image_exts(self) -> list[str]:
        return [e.strip(". ").lower() for e in self.image_ext.split(";") if e.strip(". ")]


@config("prepare.audio.hf")
class HFAudioSourceConfig:
    """`prepare.audio.source: hf`: a `datasets` dataset with an Audio column (AudioCaps, Clotho layouts)."""

    path: Str = ""  # hub dataset id, a save_to_disk directory, or a parquet file / directory
    name: Str | None = None
    revision: Str | None = None
    audio_column: Str = "audio"  # datasets.Audio (read undecoded: soundfile decodes), bytes, or file paths
    caption_column: Str | list[Str] = "caption"  # strings or lists; a list of columns: Clotho's caption_1..5
    id_column: Str | None = None  # rows sharing an id are one clip (AudioCaps: one row per caption, `youtube_id`)
    split_column: Str | None = None

    @model_validator(mode="after")
    def _columns(self) -> HFAudioSourceConfig:
        columns = [self.caption_column] if isinstance(self.caption_column, str) else self.caption_column
        if not self.audio_column.strip() or not columns or not all(c.strip() for c in columns):
            fail("audio_column/caption_column", (self.audio_column, self.caption_column), "must name columns")
        return self


@config("prepare.audio.audiofolder")
class AudioFolderConfig:
    """`prepare.audio.source: audiofolder`: audio files + metadata.jsonl / metadata.csv (`file_name` + a caption
    field), the Hugging Face audiofolder layout; split subfolders or one metadata file (divided by split_ratios)."""

    path: Str = ""
    caption_column: Str = "text"  # one caption or a list; several rows per file_name add up


_AUDIO_SOURCE_PATH = {"hf": "a hub dataset id, a save_to_disk directory or a parquet file/directory",
                      "audiofolder": "a folder with audio files and metadata.jsonl or metadata.csv"}


@config("prepare.audio")
class AudioPrepareConfig:
    """The audio modality's data and frozen features (stage prepare_audio): its own keys, so an audio change
    never re-runs image extraction and the reverse."""

    source: AudioSource = "synthetic"
    seed: Int = 0  # synthetic data; the shuffle before a ratio split
    n_train: PositiveInt = 1500  # n_*, captions_per_clip, max_events: synthetic only
    n_val: PositiveInt = 200
    n_test: PositiveInt = 200
    captions_per_clip: Annotated[Int, Field(ge=3, le=20)] = 3  # distinct paraphrases the recipe can make
    max_events: Annotated[Int, Field(ge=1, le=3)] = 3
    on_bad_sample: Literal["error", "skip"] = "error"
    splits: SplitNames = field(default_factory=SplitNames)
    split_ratios: list[Float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    max_samples: PositiveInt | None = None  # at most this many clips per split; null: all
    hf: HFAudioSourceConfig = field(default_factory=HFAudioSourceConfig)
    audiofolder: AudioFolderConfig = field(default_factory=AudioFolderConfig)
    pooling: AudioPooling = "grid"  # FrozenAudioEncoder: how encoder frames become one feature (README: audio)
    grid: PositiveInt = 4  # time segments for pooling=grid
    batch_size: PositiveInt = 64  # extraction batch size (operational)
    tiny_whisper: TinyWhisperConfig = field(default_factory=TinyWhisperConfig)

    @model_validator(mode="after")
    def _source(self) -> AudioPrepareConfig:
        if self.source != "synthetic" and not getattr(self, self.source).path.strip():
            fail(f"{self.source}.path", getattr(self, self.source).path,
                 f"prepare.audio.source is {self.source}: set it to {_AUDIO_SOURCE_PATH[self.source]}")
        check_ratios(self.split_ratios)
        return self


def check_ratios(r: list[float]) -> None:
    if len(r) != 3 or min(r) <= 0 or not math.isclose(sum(r), 1.0, abs_tol=1e-6):
        fail("split_ratios", r, "need 3 shares [train, val, test], each > 0, summing to 1")


_SOURCE_PATH = {"hf": "a hub dataset id, a save_to_disk directory or a parquet file/directory",
                "imagefolder": "a folder with images and metadata.jsonl or metadata.csv",
                "webdataset": "a folder, glob or brace pattern of .tar shards"}


@config("prepare")
class PrepareConfig:
    """Dataset (synthetic, a `datasets` dataset, an image folder, tar shards) and frozen-feature extraction."""

    source: Source = "synthetic"
    seed: Int = 0  # synthetic data; the shuffle before a ratio split
    n_train: PositiveInt = 3000  # n_*, captions_per_image, max_objects: synthetic only
    n_val: PositiveInt = 300
    n_test: PositiveInt = 300
    image_size: PositiveInt = 64  # synthetic images and the builtin tiny CLIP's input size
    captions_per_image: PositiveInt = 3
    max_objects: PositiveInt = 4
    on_bad_sample: Literal["error", "skip"] = "error"  # hf/imagefolder: stop at the first bad sample | drop + count it
    splits: SplitNames = field(default_factory=SplitNames)
    split_ratios: list[Float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # [train, val, test], one-split sources
    max_samples: PositiveInt | None = None  # at most this many images per split (hf/imagefolder); null: all
    hf: HFSourceConfig = field(default_factory=HFSourceConfig)
    imagefolder: ImageFolderConfig = field(default_factory=ImageFolderConfig)
    webdataset: WebDatasetConfig = field(default_factory=WebDatasetConfig)
    vision_pooling: VisionPooling = "grid"  # how the vision tower's tokens become one feature (FrozenVisionEncoder)
    vision_grid: PositiveInt = 4  # grid side for vision_pooling=grid
    batch_size: PositiveInt = 128  # feature-extraction batch size
    feature_dtype: Literal["float32", "float16"] = "float32"  # the feature cache's dtype (float16 halves disk and I/O)
    # Frozen encoders (every modality's, and the text encoder) under bf16 autocast while extracting; features are
    # stored as feature_dtype. auto: bf16 where the device computes it natively (a bf16 GPU; a CPU with AMX or
    # AVX512-BF16), else none. The cache records the precision used.
    mixed_precision: Literal["auto", "none", "bf16"] = "auto"
    num_workers: NonNegativeInt = 0  # workers decoding/checking images and preprocessing them for extraction
    tiny_clip: TinyCLIPConfig = field(default_factory=TinyCLIPConfig)
    tiny_llm: TinyLLMSpec = field(default_factory=TinyLLMSpec)
    audio: AudioPrepareConfig = field(default_factory=AudioPrepareConfig)

    def section(self, modality: str) -> Any:
        """A modality's data keys: the image's are this section's own (its seed-era layout), every other
        modality's the subsection of its name (`prepare.audio`)."""
        return self if modality == "image" else getattr(self, modality)

    @model_validator(mode="after")
    def _source(self) -> PrepareConfig:
        if self.source != "synthetic" and not getattr(self, self.source).path.strip():
            fail(f"{self.source}.path", getattr(self, self.source).path,
                  f"prepare.source is {self.source}: set it to {_SOURCE_PATH[self.source]}")
        check_ratios(self.split_ratios)
        return self


# -- training: one loop, two phases ----------------------------------------------------------------------
@config("training")
class TrainingConfig:
    """The loop both phases run (train.fit): AdamW, linear warmup + cosine decay, gradient clipping, a
    resumable training state. Defaults: params.yaml's align section (ProjectTrainConfig: project's)."""

    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.01
    batch_size: PositiveInt = 256
    num_epochs: PositiveInt = 30
    warmup_ratio: Fraction = 0.05  # share of all steps spent warming up
    grad_clip: PositiveFloat = 1.0  # max gradient norm
    seed: Int = 42
    resume: Literal["auto", "never"] = "auto"  # auto: a killed run resumes from its saved training state
    state_every: PositiveInt = 50  # steps between training-state snapshots
    mixed_precision: Literal["none", "bf16"] = "none"  # bf16: autocast; weights and the loss stay float32


@config("align")
class AlignTrainConfig(TrainingConfig):
    """Phase 1 training: the loop + the CLIP and Matryoshka loss weights (losses.alignment_loss)."""

    batch_size: Annotated[Int, Field(ge=2)] = 256  # >= 2: a contrastive loss needs negatives
    clip_weight: NonNegativeFloat = 1.0
    mrl_weight: NonNegativeFloat = 1.0
    mrl_weights: list[NonNegativeFloat] | None = None  # one per mrl dim; None = equal weights
    # each (modality, text) pair's share of the loss (pairs of a modality that is off are ignored)
    pair_weights: dict[Literal[MODALITIES], NonNegativeFloat] = field(  # type: ignore[valid-type]
        default_factory=lambda: {m: 1.0 for m in MODALITIES})

    @model_validator(mode="after")
    def _loss_weights(self) -> AlignTrainConfig:
        if self.clip_weight + self.mrl_weight == 0:
            fail("clip_weight/mrl_weight", (self.clip_weight, self.mrl_weight), "must not both be 0")
        if not any(self.pair_weights.values()):
            fail("pair_weights", self.pair_weights, "at least one (modality, text) pair needs a weight > 0")
        return self

    def pair_weight(self, modality: str) -> float:
        return self.pair_weights.get(modality, 1.0)


@config("project")
class ProjectTrainConfig(TrainingConfig):
    """Phase 2 training: the loop with the project section's defaults, length-grouped batches, a caption watch."""

    lr: PositiveFloat = 5e-3
    weight_decay: NonNegativeFloat = 0.0
    batch_size: PositiveInt = 64
    num_epochs: PositiveInt = 3
    seed: Int = 0
    group_by_length: Bool = True  # batches of similar caption lengths (within the seeded shuffle): less padding
    # an epoch: every caption once (all, ClipCap) | every item once with one of its captions drawn (one)
    caption_sampling: Literal["all", "one"] = "all"
    # also train a projector on the images alone (models/projector/image_only): evaluate feeds it audio, the
    # zero-shot check of the shared space; off by default (it costs the image part of project again)
    zero_shot_check: Bool = False
    # passes over each modality's captions per epoch (default 1): a smaller modality can get more steps
    modality_passes: dict[Literal[MODALITIES], PositiveInt] = field(  # type: ignore[valid-type]
        default_factory=dict)
    watch_images: NonNegativeInt = 16  # val images captioned after each epoch (MLflow table + val/distinct); 0: none


# -- Phase 1: the aligner --------------------------------------------------------------------------------
@config("align.encoders")
class EncoderSpec:
    """A frozen encoder as the aligner loads it lazily (for raw inputs): name/path, feature size, pooling."""

    model_name: Str
    dim: PositiveInt | None = None
    pooling: Str = "mean"
    grid: PositiveInt = 4


@config("align")
class AlignerConfig:
    """Phase 1 model: frozen encoders -> MLP adapters -> a shared space of size `d_align`; what
    VisionTextAligner.from_pretrained reads. `vision_dim`/`text_dim`: filled in from the encoders.

    modalities: which modalities have an adapter (each paired with text). The image's frozen encoder is
    the `vision_*` fields (the seed's names); every other modality's is its entry in `encoders`.
    """

    # The frozen encoders are chosen by `models` and pooled by `prepare`: the align stage takes them from
    # the feature caches, so the align section may not set them. Defaults: the seed's Quick Start models.
    GIVEN: ClassVar[tuple[str, ...]] = ("vision_model_name", "text_model_name", "vision_dim", "text_dim",
                                        "vision_pooling", "vision_grid", "modalities", "encoders")
    vision_model_name: Str = "openai/clip-vit-base-patch32"
    text_model_name: Str = "sentence-transformers/all-MiniLM-L6-v2"
    vision_dim: PositiveInt | None = None
    text_dim: PositiveInt | None = None
    vision_pooling: VisionPooling = "cls"  # CLIP's own pooled output; the pipeline's builtin stand-in uses grid
    vision_grid: PositiveInt = 4
    modalities: list[Literal[MODALITIES]] = field(default_factory=lambda: ["image"])  # type: ignore[valid-type]
    encoders: dict[Str, EncoderSpec] = field(default_factory=dict)
    d_align: PositiveInt = 256
    hidden_dim: PositiveInt = 512  # adapter hidden width
    depth: PositiveInt = 2  # linear layers per adapter (1 = a single linear map)
    dropout: Fraction = 0.1
    activation: Activation = "gelu"
    mrl_dims: list[PositiveInt] = field(default_factory=lambda: [32, 64, 128, 256])  # Matryoshka prefix sizes
    logit_scale_init: Float = 14.285714  # 1 / 0.07, CLIP's initial temperature
    logit_scale_max: Float = 100.0  # clamp, as CLIP does

    @model_validator(mode="after")
    def _dims(self) -> AlignerConfig:
        dims = list(self.mrl_dims)
        if not dims or dims != sorted(set(dims)) or dims[-1] > self.d_align:
            fail("mrl_dims", dims, f"must be strictly ascending, each in 1..d_align={self.d_align}")
        if not 1.0 <= self.logit_scale_init <= self.logit_scale_max:
            fail("logit_scale_init", self.logit_scale_init, f"must be in [1, logit_scale_max={self.logit_scale_max}]")
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            fail("modalities", self.modalities, f"need distinct modalities from {', '.join(MODALITIES)}")
        missing = [m for m in self.modalities if m != "image" and m not in self.encoders]
        if missing:
            fail("encoders", sorted(self.encoders), f"need an encoder for {', '.join(missing)}")
        return self

    def encoder(self, modality: str) -> EncoderSpec:
        """The frozen encoder of `modality` (the image's: the seed's vision_* fields)."""
        if modality == "image":
            return EncoderSpec(self.vision_model_name, self.vision_dim, self.vision_pooling, self.vision_grid)
        return self.encoders[modality]


@config("align")
class AlignmentConfig(AlignerConfig, AlignTrainConfig):
    """The `align` section, and the seed's Quick Start config: the aligner and its training, flat.

    `part(cfg, AlignerConfig)` is the model; the trainer reads the AlignTrainConfig fields. The seed
    sets `cfg.device = get_device()` before `VisionTextAligner(cfg)`: an attribute, never a field.
    """

    @model_validator(mode="after")
    def _one_weight_per_dim(self) -> AlignmentConfig:
        if self.mrl_weights is not None and len(self.mrl_weights) != len(self.mrl_dims):
            fail("mrl_weights", self.mrl_weights, f"need {len(self.mrl_dims)} non-negative weights (one per mrl dim)")
        return self


# -- Phase 2: the projector + LLM ------------------------------------------------------------------------
@config("project.lora")
class LoRAConfig:
    """Optional LoRA on the LLM (peft). r=0 disables it."""

    r: NonNegativeInt = 0  # 0 disables LoRA
    alpha: Int = 16
    dropout: Fraction = 0.05
    target_modules: list[Str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@config("project")
class LLMConfig:
    """Phase 2 model: the decoder LLM and the vision-to-LLM projector that feeds it prefix tokens; what
    MultimodalLLM.from_pretrained reads."""

    # The LLM is chosen by `models` (built by the llm stage): the project section may not set it.
    GIVEN: ClassVar[tuple[str, ...]] = ("model_name", "trust_remote_code")
    model_name: Str = "Qwen/Qwen2.5-1.5B-Instruct"
    k: PositiveInt = 8  # prefix tokens per item (ClipCap uses 10)
    projector_type: Literal["mlp", "linear"] = "mlp"  # mlp (ClipCap/LLaVA-1.5) | linear (LLaVA-1)
    projector_hidden: PositiveInt = 512
    freeze_llm: Bool = True
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    prompt: Str = "Describe this image:"
    prompts: dict[Literal[MODALITIES], Str] = field(  # type: ignore[valid-type]
        default_factory=lambda: {"audio": "Describe this sound:"})  # per modality; the rest use `prompt`
    max_caption_tokens: Annotated[Int, Field(ge=2)] = 64
    trust_remote_code: Bool = False
    dtype: DType = "float32"  # the LLM's weights
    matryoshka: Bool = False  # train the projector on nested prefixes z[:, :d] of every align.mrl_dims d

    def prompt_for(self, modality: str = "image") -> str:
        return self.prompts.get(modality, self.prompt)

    @model_validator(mode="after")
    def _lora_to_finetune(self) -> LLMConfig:
        if not self.freeze_llm and self.lora.r == 0:
            fail("freeze_llm", self.freeze_llm,
                  "full LLM fine-tuning is not supported; set project.freeze_llm: true to keep the LLM frozen, "
                  "or project.lora.r > 0 to train LoRA adapters")
        return self


@config("project")
class ProjectConfig(LLMConfig, ProjectTrainConfig):
    """The `project` section: the projector + LLM and their training, flat (`part(cfg, LLMConfig)`)."""


# -- evaluation and tracking -----------------------------------------------------------------------------
@config("evaluate")
class EvaluateConfig:
    batch_size: PositiveInt = 256  # generation batch size (greedy captions do not depend on it)
    max_new_tokens: PositiveInt = 48
    num_beams: PositiveInt = 1
    blind_prefix: Literal["mean", "zero"] = "mean"  # what the blind captioner gets instead of an image
    gallery_size: NonNegativeInt = 12
    captioning: Bool = True  # False skips Phase 2 metrics (retrieval only)


@config("tracking")
class TrackingConfig:
    experiment: Str = "mmalign"
    required: Bool = True  # False: a tracking failure warns once and the stage runs untracked

    @model_validator(mode="after")
    def _named(self) -> TrackingConfig:
        if not self.experiment.strip():
            fail("experiment", self.experiment, "must be a non-empty name")
        return self
