"""Phase 2: frozen aligner -> trainable projector -> k prefix embeddings -> decoder LLM -> captions.

The projector is projector.py; where the prefix goes in the prompt is prompt.py; the lean training
step's cross-entropy is caption_loss.py. This module wires them to the LLM: build the inputs, the
loss, generation, and the checkpoint (projector + LoRA).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from ..config import LLMConfig, from_dict, part
from ..hub import local_files_only
from ..training.caption_loss import linear_cross_entropy
from ..utils import DTYPES, eval_mode, load_checkpoint, save_checkpoint
from .aligner import VisionTextAligner
from .encoders import LOAD_ERRORS, freeze, model_load_error
from .projector import VisionToLLMProjector
from .prompt import end_token_id, render_prompt, token_rows

log = logging.getLogger(__name__)


def _cache_arg() -> str:
    """The decoder's KV-cache argument: transformers 5 renamed `past_key_values` to `cache`."""
    import transformers

    return "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"


def load_llm(cfg: LLMConfig) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"trust_remote_code": cfg.trust_remote_code, "local_files_only": local_files_only(cfg.model_name)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model_name, **kw)
        llm = AutoModelForCausalLM.from_pretrained(cfg.model_name, dtype=DTYPES[cfg.dtype], use_safetensors=True,
                                                   **kw)  # never unpickle weights
    except LOAD_ERRORS as e:
        raise model_load_error(cfg.model_name, "LLM", e) from None
    if tokenizer.pad_token_id is None:  # e.g. Llama-style tokenizers; pads are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return llm, tokenizer


class MultimodalLLM(nn.Module):
    """Seed API: `MultimodalLLM(aligner, LLMConfig(model_name=...))`, then `.generate([image])`.

    Trainable: the projector, plus LoRA adapters when `cfg.lora.r > 0`. The aligner (encoders and
    adapters) and the LLM's own weights are frozen.
    """

    def __init__(self, aligner: VisionTextAligner, cfg: LLMConfig, llm: Any = None, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.aligner = freeze(aligner)
        if llm is None or tokenizer is None:
            llm, tokenizer = load_llm(cfg)
        self.tokenizer = tokenizer
        llm = freeze(llm)
        if cfg.lora.r > 0:
            from peft import LoraConfig, get_peft_model

            with warnings.catch_warnings():  # peft asks transformers 5 for is_gradient_checkpointing (deprecated)
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                llm = get_peft_model(llm, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                     lora_dropout=cfg.lora.dropout, task_type="CAUSAL_LM",
                                                     target_modules=list(cfg.lora.target_modules)))
        self.llm = llm
        d_llm = self.llm.get_input_embeddings().embedding_dim
        self.projector = VisionToLLMProjector(aligner.cfg.d_align, d_llm, cfg.k, cfg.projector_type,
                                              cfg.projector_hidden, aligner.cfg.mrl_dims if cfg.matryoshka else ())
        self.projector.to(next(self.llm.parameters()).device)
        self.end_id = end_token_id(tokenizer)
        self._pieces: dict[str, tuple[list[int], list[int]]] = {}

    def train(self, mode: bool = True) -> "MultimodalLLM":
        super().train(mode)
        self.aligner.eval()
        if self.cfg.lora.r == 0:
            self.llm.eval()  # frozen LLM: no dropout either
        return self

    # -- prompt layout -------------------------------------------------------------------------
    def prompt_pieces(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the image prefix (rendered once per prompt: every step asks)."""
        if prompt not in self._pieces:
            self._pieces[prompt] = render_prompt(self.tokenizer, prompt)
        return self._pieces[prompt]

    def build_inputs(self, prefix: torch.Tensor, captions: Sequence[Sequence[int]] | None = None,
                     prompt: str | None = None, padding_side: str = "right",
                     skip_before: bool = False) -> dict[str, torch.Tensor]:
        """Assemble [before][prefix x k][after][caption + end] per row.

        prefix (B, k, H); captions: token ids per row (training) or None (generation).
        Returns inputs_embeds (B, T, H), attention_mask (B, T) and, with captions, labels (B, T)
        that are -100 everywhere but on the caption tokens and the end token. skip_before leaves
        out [before] (the lean step has its KV cache instead).
        """
        before, after = self.prompt_pieces(self.cfg.prompt if prompt is None else prompt)
        before = [] if skip_before else before
        rows = token_rows(before, after, prefix.shape[1], captions, prefix.shape[0], self.end_id,
                          self.tokenizer.pad_token_id, self.cfg.max_caption_tokens, padding_side)
        device = prefix.device
        mask, labels = rows["attention_mask"], rows["labels"]
        embeds = self.llm.get_input_embeddings()(rows["input_ids"].to(device))  # (B, T, H)
        embeds = embeds.masked_scatter(rows["is_prefix"].to(device).unsqueeze(-1), prefix.to(embeds.dtype))
        out = {"inputs_embeds": embeds, "attention_mask": mask.to(device)}
        if captions is not None:
            out["labels"] = labels.to(device)
        return out

    # -- any modality -> z -> prefix ---------------------------------------------------------------
    def embed(self, features: torch.Tensor, modality: str = "image") -> torch.Tensor:
        """Cached frozen-encoder features (B, D) of `modality` -> z (B, d_align), through the frozen aligner."""
        with torch.no_grad():
            return self.aligner.adapters[modality](features.to(next(self.projector.parameters()).device))

    def prefix_from_z(self, z: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """z (B, d_align) of any modality -> prefix (B, k, H), from z's first `dim` coordinates."""
        return self.projector(self.nested(z.to(next(self.projector.parameters()).device), dim))

    def prefix_from_features(self, vision_features: torch.Tensor, dim: int | None = None,
                             modality: str = "image") -> torch.Tensor:
        """Cached frozen-encoder features (B, D) -> prefix (B, k, H), from z's first `dim` coordinates."""
        return self.prefix_from_z(self.embed(vision_features, modality), dim)

    def nested(self, z: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """z (B, d) -> the projector's input for z[:, :dim], (B, d); dim None or >= d: z itself.

        The prefix is re-normalised (Phase 1's MRL loss made each normalised prefix the embedding, so every
        dim arrives at the scale it was trained at), then mapped back to d by the Matryoshka projector's own
        linear map for that dim (`projector.nested_in`), or else zero-padded (a full-dim-only projector).
        """
        d = z.shape[-1]
        if dim is None or dim >= d:
            return z
        small = torch.nn.functional.normalize(z[:, :dim], dim=-1)
        if str(dim) in self.projector.nested_in:
            return self.projector.nested_in[str(dim)](small)
        return torch.nn.functional.pad(small, (0, d - dim))

    def nested_prefix(self, z: torch.Tensor) -> torch.Tensor:
        """Matryoshka training: each row of z (B, d) at one of the smaller MRL dims, drawn uniformly -> (B, k, H).

        The shared projector runs with its weights detached, so this path trains only the per-dim input maps
        and the shared weights get the full-dim loss's gradient only, as in a full-dim-only projector (rows
        at a random dim that also trained the shared weights made them a compromise between dims).
        """
        dims = [int(d) for d in self.projector.nested_in]
        pick = torch.randint(len(dims), (z.shape[0],), device=z.device)
        x = z.new_zeros(z.shape)
        for i, d in enumerate(dims):  # every map runs, on 0 rows too: DDP sees all parameters used
            rows = pick == i
            x = x.index_put((rows,), self.nested(z[rows], d))
        return self.projector.forward_frozen(x)

    def prefix_from_items(self, items: Sequence[Any], modality: str = "image") -> torch.Tensor:
        """Raw inputs of `modality` (images or paths; audio arrays, files or bytes) -> prefix (B, k, H)."""
        with torch.no_grad():
            z = self.aligner.encode(modality, items)
        return self.prefix_from_z(z)

    def prefix_from_images(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        return self.prefix_from_items(images, "image")

    def forward(self, vision_features: torch.Tensor | None, captions: Sequence[Sequence[int]], lean: bool = False,
                modality: str = "image", z: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Teacher-forced next-token loss on caption tokens only. Returns (logits, loss).

        Input: cached features of `modality` (B, D), or their aligned embeddings `z` (B, d_align) (the project
        stage computes z once per item). The prompt is the modality's (cfg.prompt_for).
        lean=True: the same loss from `lean_loss` (training and validation use it); logits is None.
        A Matryoshka projector in training adds each row again at a random smaller dim (`nested_prefix`):
        the loss is then the full-dim loss plus the nested one, logits (2B, T, V).
        """
        z = self.embed(vision_features, modality) if z is None else z.to(next(self.projector.parameters()).device)
        prefix, prompt = self.prefix_from_z(z), self.cfg.prompt_for(modality)
        copies = 1
        if self.training and len(self.projector.nested_in):
            prefix, captions, copies = torch.cat([prefix, self.nested_prefix(z)]), [*captions, *captions], 2
        if lean:  # the mean over 2B rows of equal captions, times 2: full-dim loss + nested loss
            return None, self.lean_loss(prefix, captions, prompt) * copies
        out = self.llm(**self.build_inputs(prefix, captions, prompt))
        return out.logits, out.loss * copies

    def prompt_cache_usable(self, prompt: str | None = None) -> bool:
        """The pre-image prompt's KV can be computed once without grad: nothing in the LLM trains (no LoRA)."""
        return bool(self.prompt_pieces(self.cfg.prompt if prompt is None else prompt)[0]) and \
            not any(p.requires_grad for p in self.llm.parameters())

    def lean_loss(self, prefix: torch.Tensor, captions: Sequence[Sequence[int]],
                  prompt: str | None = None) -> torch.Tensor:
        """The plain path's loss, spending compute only where a gradient or a label needs it.

        prefix (B, k, H). The fixed tokens before the image are run once (batch 1, no grad) and their
        KV cache is repeated across the batch when the LLM is frozen; hidden states go through the LM
        head only at positions whose next token is a caption label (caption_loss.linear_cross_entropy).
        """
        prompt = self.cfg.prompt if prompt is None else prompt
        cached = self.prompt_cache_usable(prompt)
        inputs = self.build_inputs(prefix, captions, prompt, skip_before=cached)
        embeds, mask, labels = inputs["inputs_embeds"], inputs["attention_mask"], inputs["labels"]  # (B, T, H), (B, T)
        B, T = mask.shape
        decoder = self.llm.get_decoder()
        kw: dict[str, Any] = {}
        if cached:
            cache, P = self._prompt_cache(decoder, B, prompt)
            kw = {_cache_arg(): cache, "use_cache": True,
                  "position_ids": torch.arange(P, P + T, device=mask.device).expand(B, T)}  # cached are 0..P-1
            mask = torch.cat([mask.new_ones(B, P), mask], 1)  # (B, P + T)
        hidden = decoder(inputs_embeds=embeds, attention_mask=mask, **kw).last_hidden_state  # (B, T, H)
        keep = labels[:, 1:] != -100  # (B, T-1): position t predicts token t+1
        return linear_cross_entropy(hidden[:, :-1][keep], self.llm.get_output_embeddings(), labels[:, 1:][keep])

    @torch.no_grad()
    def _prompt_cache(self, decoder: nn.Module, batch: int, prompt: str) -> tuple[Any, int]:
        """KV cache of the pre-image prompt, computed at batch 1 and repeated to `batch` rows."""
        from transformers import DynamicCache

        before, _ = self.prompt_pieces(prompt)
        ids = torch.tensor([before], device=next(self.projector.parameters()).device)  # (1, P)
        cache = DynamicCache()
        decoder(inputs_embeds=self.llm.get_input_embeddings()(ids), use_cache=True, **{_cache_arg(): cache})
        cache.batch_repeat_interleave(batch)
        return cache, len(before)

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_from_prefix(self, prefix: torch.Tensor, prompt: str | None = None, max_new_tokens: int = 48,
                             num_beams: int = 1, do_sample: bool = False, temperature: float = 1.0,
                             top_p: float = 1.0, use_cache: bool = True) -> list[str]:
        """prefix (B, k, H) -> one caption per row; left padding so every row ends where decoding starts."""
        inputs = self.build_inputs(prefix, None, prompt, padding_side="left")
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
        with eval_mode(self):  # LoRA dropout is live on a fresh or training model; greedy must be deterministic
            out = self.llm.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, use_cache=use_cache,
                                    pad_token_id=self.tokenizer.pad_token_id,
                                    eos_token_id=[self.end_id, self.tokenizer.eos_token_id], **sampling)
        # With only inputs_embeds given, generate returns just the new tokens.
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def generate(self, images: Sequence[Any], prompt: str | None = None,
                 max_new_tokens: int = 48, num_beams: int = 1, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, batch_size: int = 32, use_cache: bool = True,
                 modality: str = "image") -> list[str]:
        """PIL images or paths (or with modality="audio", clips: arrays, files, bytes) -> one caption each,
        batched. Greedy (the default) is deterministic. `prompt`: None uses the prompt the projector was
        trained with for the modality (cfg.prompt_for)."""
        captions: list[str] = []
        prompt = self.cfg.prompt_for(modality) if prompt is None else prompt
        with eval_mode(self):
            for i in range(0, len(images), batch_size):
                prefix = self.prefix_from_items(images[i:i + batch_size], modality)
                captions += self.generate_from_prefix(prefix, prompt, max_new_tokens, num_beams, do_sample,
                                                      temperature, top_p, use_cache)
        return captions

    # -- checkpoints (projector + LoRA only) -----------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        if self.cfg.lora.r > 0:
            from peft import get_peft_model_state_dict

            state.update({f"lora.{k}": v for k, v in get_peft_model_state_dict(self.llm).items()})
        return state

    def save_pretrained(self, directory: str | Path) -> None:
        """model.safetensors + config.json: the LLMConfig (the model, not how it was trained)."""
        save_checkpoint(directory, self.trainable_state_dict(), dataclasses.asdict(part(self.cfg, LLMConfig)))

    @classmethod
    def from_pretrained(cls, directory: str | Path, aligner: VisionTextAligner, **overrides: Any) -> "MultimodalLLM":
        tensors, cfg = load_checkpoint(directory)
        model = cls(aligner, from_dict(LLMConfig, {**cfg, **overrides}, f"{directory}/config.json"))
        if not any(k.startswith("projector.nested_in.") for k in tensors):
            model.projector.nested_in = nn.ModuleDict()  # saved without per-dim maps: zero padding, as trained
        model.projector.load_state_dict({k[len("projector."):]: v for k, v in tensors.items() if k.startswith("projector.")})
        lora = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
        if lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model.llm, lora)
        return model
