"""Tests for the locally built tiny Qwen2 LM (the offline stand-in for Qwen2.5)."""

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from mmalign.standins.tiny_llm import BOS, EOS, IM_END, IM_START, PAD, TinyLLMSpec, build_tiny_llm, build_tokenizer

COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "star"]
RELATIONS = ["left of", "right of", "above", "below"]


def make_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)} {rng.choice(RELATIONS)} a {rng.choice(COLOURS)} {rng.choice(SHAPES)}"
        for _ in range(n)
    ]


def tiny_spec(**overrides) -> TinyLLMSpec:
    kw = dict(vocab_size=320, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
              max_position_embeddings=64, steps=60, batch_size=32, lr=1e-2, seed=0)
    return TinyLLMSpec(**{**kw, **overrides})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and two OpenMP threads competing with
    another busy process spin-wait: a 1 s build took 30+ s that way on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return make_captions(400)


@pytest.fixture(scope="module")
def built(captions, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny_llm") / "llm"
    return out, build_tiny_llm(captions, out, tiny_spec(), progress=False)


def test_saved_dir_loads_as_qwen2_with_special_ids(built, captions):
    out, stats = built
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, Qwen2ForCausalLM)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)
    ids = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert len(set(ids)) == 3 and None not in ids
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == ids
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.config.vocab_size == len(tok) == stats["vocab_size"]
    assert stats["n_params"] == sum(p.numel() for p in model.parameters())
    # The loaded tokenizer (transformers may pick Qwen2Tokenizer) must tokenize exactly as the one trained.
    trained = build_tokenizer(captions, tiny_spec().vocab_size)
    for text in [captions[0], "A Red circle, 42 times!\n\tcafé"]:
        assert tok(text)["input_ids"] == trained(text)["input_ids"]
    # Batched generation with left padding, as the captioner uses it.
    tok.padding_side = "left"
    batch = tok([BOS + "a red", BOS + "a"], return_tensors="pt", padding=True)
    assert batch["input_ids"][1, 0] == tok.pad_token_id
    gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert gen.shape[0] == 2 and gen.shape[1] <= batch["input_ids"].shape[1] + 4


def test_tokenizer_knows_the_default_prompts_words(captions):
    """From captions alone BPE spells the prompt in pieces; a real LLM's vocabulary has its words (at the
    default vocab_size, which the caption corpus leaves room in)."""
    from mmalign.config import LLMConfig, TinyLLMSpec
    from mmalign.standins.tiny_llm import default_prompts

    tok = build_tokenizer(captions, TinyLLMSpec().vocab_size)
    cfg = LLMConfig()
    assert default_prompts() == [cfg.prompt, *cfg.prompts.values()]
    for prompt in default_prompts():
        assert len(tok.tokenize(prompt)) == len(prompt.split()) + prompt.endswith(":")  # a word a token, and ":"
        assert tok.decode(tok(prompt)["input_ids"]) == prompt


def test_build_is_deterministic_and_replaces_out_dir_atomically(built, captions, tmp_path):
    out_a, stats_a = built
    out_b = tmp_path / "llm"
    out_b.mkdir()
    (out_b / "stale.txt").write_text("old build")
    stats_b = build_tiny_llm(captions, out_b, tiny_spec(), progress=False)
    assert (out_a / "model.safetensors").read_bytes() == (out_b / "model.safetensors").read_bytes()
    assert (out_a / "tokenizer.json").read_bytes() == (out_b / "tokenizer.json").read_bytes()
    assert stats_a == stats_b
    assert not (out_b / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm"]  # no temp or old dirs left beside it
    other = build_tiny_llm(captions, tmp_path / "seed1", tiny_spec(seed=1), progress=False)
    a, c = load_file(out_a / "model.safetensors"), load_file(tmp_path / "seed1" / "model.safetensors")
    assert other["initial_loss"] != stats_a["initial_loss"]
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def _caption_nll(model, tok, text: str) -> float:
    ids = torch.tensor([[tok.bos_token_id, *tok(text)["input_ids"], tok.eos_token_id]])
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_pretraining_learns_the_caption_language(built, captions):
    out, stats = built
    assert stats["steps"] == tiny_spec().steps
    assert stats["final_loss"] < stats["initial_loss"] - 2.0
    model, tok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    rng = random.Random(1)
    for text in captions[:10]:
        words = text.split()
        shuffled = " ".join(rng.sample(words, len(words)))
        if shuffled != text:
            assert _caption_nll(model, tok, text) < _caption_nll(model, tok, shuffled) - 1.0


def test_tokenizer_round_trip_without_automatic_special_tokens(captions):
    tok = build_tokenizer(captions, vocab_size=300)
    for text in [captions[0], "  Unseen: Zebra 123, naïve café!\n\ttabs ", ""]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert not {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} & set(ids)
    assert len(tok(BOS)["input_ids"]) == 1 and len(tok(EOS)["input_ids"]) == 1
    tok.padding_side = "right"
    batch = tok(["a", "a red circle"], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id and batch["attention_mask"][0][-1] == 0


def test_chat_template_is_chatml(captions, tmp_path):
    tok = build_tokenizer(captions, vocab_size=300, chat_template=True)
    msgs = [{"role": "user", "content": "Describe the image."}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"
    with_system = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *msgs], tokenize=False)
    assert with_system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nDescribe the image.<|im_end|>\n"
    for special in (IM_START, IM_END):
        assert tok(special)["input_ids"] == [tok.convert_tokens_to_ids(special)]
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == "user\nDescribe the image.\nassistant\n"

    out = tmp_path / "chat"
    build_tiny_llm(captions[:100], out, tiny_spec(steps=2, chat_template=True), progress=False)
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == text
    gen_eos = AutoModelForCausalLM.from_pretrained(out).generation_config.eos_token_id
    assert gen_eos == [loaded.convert_tokens_to_ids(IM_END), loaded.eos_token_id]


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("hidden_size", dict(hidden_size=30, num_heads=4)),
        ("num_kv_heads", dict(num_heads=4, num_kv_heads=3)),
        ("vocab_size", dict(vocab_size=100)),
        ("steps", dict(steps=0)),
        ("batch_size", dict(batch_size=-1)),
        ("lr", dict(lr=0.0)),
        ("max_position_embeddings", dict(max_position_embeddings=2)),
    ],
)
def test_invalid_spec_names_the_field(field, overrides):
    """The params dialect: one line naming the full key, as every other section."""
    with pytest.raises(ValueError, match=rf"^prepare\.tiny_llm\.{field}=\S+ is invalid: "):
        TinyLLMSpec(**overrides)


def test_length_sorted_pieces_give_the_one_piece_loss_and_gradient(captions):
    """_batch_loss runs a batch as length-sorted pieces; the loss and every gradient equal HF's loss on the whole
    right-padded batch (mean over all label tokens), mixed lengths and a batch smaller than the piece count included."""
    from mmalign.standins.tiny_llm import _batch_loss, _encode_corpus, caption_documents

    tok = build_tokenizer(captions, 320)
    texts = caption_documents([captions[i:i + 3] for i in range(0, 30, 3)], seed=0)  # singles and pairs
    ids, lengths = _encode_corpus(tok, texts, 64)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    for rows in (torch.arange(len(texts)), torch.tensor([3, 1])):
        L = int(lengths[rows].max())
        x = ids[rows, :L]
        labels = x.masked_fill(torch.arange(L) >= lengths[rows, None], -100)
        model.zero_grad()
        ref = model(input_ids=x, labels=labels).loss
        ref.backward()
        ref_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        loss = _batch_loss(model, ids[rows], lengths[rows])
        loss.backward()
        assert lengths[rows].unique().numel() > 1
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        for g, r in zip((p.grad for p in model.parameters()), ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
