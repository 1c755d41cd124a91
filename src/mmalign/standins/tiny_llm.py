"""A small Qwen2 causal LM built locally: the offline stand-in for `Qwen/Qwen2.5-1.5B-Instruct`.

No model hub is reachable here (DESIGN.md, "offline default", point 3), so the default LLM
is a `Qwen2ForCausalLM` with a byte-level BPE tokenizer trained on the caption corpus,
briefly pretrained as a plain language model, and saved in Hugging Face format so the rest
of the code loads it through the same `AutoModelForCausalLM.from_pretrained` path as the
real model.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    get_cosine_schedule_with_warmup,
)

from ..config import LLMConfig, TinyLLMSpec  # noqa: F401 (TinyLLMSpec re-exported: it lives with the other configs)
from ..utils import atomic_path
from ..utils import progress as progress_bar

logger = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Qwen2.5's ChatML layout without its default system message (a system turn stays optional).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer). transformers 5 loads any `qwen2`
# checkpoint's tokenizer as Qwen2Tokenizer, which rebuilds NFC + this split + ByteLevel around
# the saved vocab/merges, so training with the same pipeline keeps built and loaded tokenizers equal.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _special_tokens(chat_template: bool) -> list[str]:
    return [BOS, EOS, PAD] + ([IM_START, IM_END] if chat_template else [])


def default_prompts() -> list[str]:
    """The project stage's default prompts (LLMConfig.prompt, .prompts). The tokenizer learns their words, as
    a real LLM's vocabulary holds them: from captions alone BPE spells "Describe" in 6 pieces, and the prompt
    after the prefix takes 12 tokens instead of 5, a quarter of an image training row (measured on the default
    data). The LM is not pretrained on them: it meets them in Phase 2, as it meets the prefix."""
    cfg = LLMConfig()
    return [cfg.prompt, *cfg.prompts.values()]


def build_tokenizer(texts: list[str], vocab_size: int, chat_template: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and the default prompts; like Qwen's, it adds no bos/eos
    when encoding."""
    specials = _special_tokens(chat_template)  # unk = eos below mirrors Qwen2Tokenizer; byte-level BPE never emits it
    tok = Tokenizer(models.BPE())
    # Byte-level without prefix space: decode(encode(x)) == x for any NFC text, as in Qwen.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [*texts, *default_prompts()]
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=EOS, padding_side="right",
        add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
        extra_special_tokens=specials[3:],
    )
    if chat_template:
        hf_tok.chat_template = CHATML_TEMPLATE
    return hf_tok


def _encode_corpus(tok: PreTrainedTokenizerFast, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode "<bos> text <eos>" right-padded; returns ids (N, L) and lengths (N,)."""
    rows = [[tok.bos_token_id, *ids[: max_len - 2], tok.eos_token_id] for ids in tok(texts)["input_ids"]]
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), tok.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, lengths


PIECES = 4  # a batch runs as this many length-sorted pieces (see _batch_loss)


def _batch_loss(model: Qwen2ForCausalLM, ids: torch.Tensor, lengths: torch.Tensor, pieces: int = PIECES) -> torch.Tensor:
    """Mean next-token loss of a right-padded batch, ids (B, L): the mean over every label token of the batch.

    The rows run as `pieces` groups of similar length, each cropped to its own longest row: the corpus mixes
    single captions with caption pairs (14 to 133 tokens on the default data), so one (B, longest) tensor is
    63% padding and four sorted pieces compute 40% fewer positions. Same loss and gradient as one piece (the
    token losses are summed, then divided by the batch's label count), up to float summation order.
    """
    order = torch.argsort(lengths, stable=True)
    total = torch.zeros(())
    for part in order.tensor_split(min(pieces, len(order))):
        n = int(lengths[part].max())
        rows = ids[part, :n]  # (b, n)
        labels = rows.masked_fill(torch.arange(n) >= lengths[part, None], -100)
        # No attention_mask needed: with right padding and causal attention no real token sees a pad.
        logits = model(input_ids=rows).logits[:, :-1]  # (b, n-1, V): position t predicts token t+1
        total = total + F.cross_entropy(logits.float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                                        reduction="sum")
    return total / int((lengths - 1).sum())


def caption_documents(captions: list[list[str]], seed: int = 0) -> list[str]:
    """Pretraining corpus from per-image caption lists: each image gives one single caption and two
    documents of two paraphrases on consecutive lines.

    Paraphrase pairs teach the stand-in what a real LLM already knows: to re-use what its context
    says. Without them the frozen LM ignores a soft prefix (overfitting 8 captions through a
    16-token prefix stalls at loss 0.63 vs 0.33 with pairs, measured on the default data).
    """
    rng = random.Random(seed)
    docs: list[str] = []
    for caps in captions:
        docs.append(rng.choice(caps))
        for _ in range(2):
            if len(caps) > 1:
                a, b = rng.sample(caps, 2)
                docs.append(f"{a}\n{b}")
    return docs


def build_tiny_llm(texts: list[str], out_dir: str | Path, spec: TinyLLMSpec, progress: bool = True) -> dict:
    """Train tokenizer + pretrain a tiny Qwen2 LM on `texts`, save it atomically to `out_dir`.

    Pretraining (LM only, no images) makes Phase 2 mirror the real setting: a frozen LM that
    already knows the caption language, so the projector only has to bring in the image content.
    Returns {"initial_loss", "final_loss", "steps", "n_params", "vocab_size"}; the losses are
    measured on a fixed sample of training captions before and after pretraining. Same texts +
    spec give bit-identical model.safetensors on one CPU/torch build (checked with 1 and 2 threads).
    """
    if not texts:
        raise ValueError("build_tiny_llm needs at least one caption in `texts`, got an empty list")
    out_dir = Path(out_dir)
    tok = build_tokenizer(texts, spec.vocab_size, spec.chat_template)
    tok.model_max_length = spec.max_position_embeddings
    ids, lengths = _encode_corpus(tok, texts, spec.max_position_embeddings)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(spec.seed)
        model = Qwen2ForCausalLM(config)
    eos_ids = [tok.convert_tokens_to_ids(IM_END), tok.eos_token_id] if spec.chat_template else tok.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=eos_ids, pad_token_id=tok.pad_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("tiny LLM: %d params, vocab %d, %d captions, %d steps", n_params, len(tok), len(texts), spec.steps)

    gen = torch.Generator().manual_seed(spec.seed)
    eval_idx = torch.randperm(len(texts), generator=gen)[: 4 * spec.batch_size]

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = _batch_loss(model, ids[eval_idx], lengths[eval_idx]).item()
        model.train()
        return loss

    initial_loss = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=max(1, spec.steps // 20), num_training_steps=spec.steps)
    for step in (bar := progress_bar(range(spec.steps), desc="pretrain tiny LLM", disable=not progress)):
        idx = torch.randint(len(texts), (spec.batch_size,), generator=gen)
        loss = _batch_loss(model, ids[idx], lengths[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)  # a piped log gets it every 15 s
    final_loss = eval_loss()
    if not math.isfinite(final_loss):
        raise RuntimeError(f"tiny LLM pretraining diverged (final loss {final_loss}); "
                           f"lower prepare.tiny_llm.lr (now {spec.lr})")
    logger.info("tiny LLM loss %.4f -> %.4f", initial_loss, final_loss)

    _save_atomic(model.eval(), tok, out_dir)
    return {"initial_loss": initial_loss, "final_loss": final_loss, "steps": spec.steps,
            "n_params": n_params, "vocab_size": len(tok)}


def _save_atomic(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Write into a temp dir beside `out_dir`, then swap it in, so readers never see a half-written model."""
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    logger.info("saved tiny LLM to %s", out_dir)
