"""Tiny models built locally in seconds, for tests and benchmarks (no hub)."""

from __future__ import annotations

import shutil
from pathlib import Path


def tiny_sentence_transformer(path: Path) -> Path:
    """A sentence-transformers model dir (1-layer BERT, hidden 32, mean pooling) with MiniLM's tokenizer."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    from transformers import BertConfig, BertModel

    from mmalign.hub import resolve_text_model

    bert = path / "bert"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert)
    minilm = resolve_text_model("sentence-transformers/all-MiniLM-L6-v2")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{minilm}/{name}", bert / name)
    SentenceTransformer(modules=[st_models.Transformer(str(bert)), st_models.Pooling(32)], device="cpu").save(
        str(path / "st"))
    return path / "st"
