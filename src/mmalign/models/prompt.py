"""The prompt layout of Phase 2: where the image prefix sits among the LLM's tokens, per row

    [before][prefix x k][after][caption + end]

`before` / `after` come from the prompt: with a chat template the image opens the user's turn (the
template's default system prompt included), otherwise the prefix goes first, after BOS. Labels are
-100 everywhere but on the caption tokens and the end token.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

IMAGE_MARK = "<image>"  # split point in the rendered chat template; never tokenized


def end_token_id(tokenizer: Any) -> int:
    """The token that ends a caption: `<|im_end|>` for ChatML turns, else EOS."""
    if tokenizer.chat_template and "<|im_end|>" in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids("<|im_end|>")
    return tokenizer.eos_token_id


def render_prompt(tokenizer: Any, prompt: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the image prefix."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{IMAGE_MARK}\n{prompt}"}],
                                             tokenize=False, add_generation_prompt=True)
        before, after = text.split(IMAGE_MARK, 1)
    else:
        before, after = "", f"{prompt} " if prompt else ""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not tokenizer.chat_template else []
    return bos + enc(before), enc(after)


def token_rows(before: list[int], after: list[int], k: int, captions: Sequence[Sequence[int]] | None, batch: int,
               end_id: int, pad_id: int, max_caption_tokens: int, padding_side: str = "right"
               ) -> dict[str, torch.Tensor]:
    """The layout as tensors (B, T): input_ids (pad where the prefix goes), labels, attention_mask and
    is_prefix (True at the k prefix positions). captions: token ids per row (training) or None
    (generation: left padding, so every row ends where decoding starts)."""
    rows, label_rows = [], []
    for b in range(batch):
        cap = list(captions[b][: max_caption_tokens - 1]) + [end_id] if captions is not None else []
        ids = before + [pad_id] * k + after + cap
        rows.append(ids)
        label_rows.append([-100] * (len(ids) - len(cap)) + cap)
    T = max(map(len, rows))
    out = {"input_ids": torch.full((batch, T), pad_id, dtype=torch.long),
           "labels": torch.full((batch, T), -100, dtype=torch.long),
           "attention_mask": torch.zeros((batch, T), dtype=torch.long),
           "is_prefix": torch.zeros((batch, T), dtype=torch.bool)}
    for b, (row, lab) in enumerate(zip(rows, label_rows)):
        start = 0 if padding_side == "right" else T - len(row)
        out["input_ids"][b, start:start + len(row)] = torch.tensor(row)
        out["labels"][b, start:start + len(row)] = torch.tensor(lab)
        out["attention_mask"][b, start:start + len(row)] = 1
        out["is_prefix"][b, start + len(before):start + len(before) + k] = True
    return out
