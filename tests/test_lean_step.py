"""The lean Phase 2 step (prompt KV cache, logits on labelled positions, chunked fused cross-entropy)
gives the plain `llm(inputs_embeds=..., labels=...)` step's loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmalign.training.caption_loss import linear_cross_entropy
from mmalign.config import LoRAConfig
from test_llm import D_VISION, caption_ids, make_aligner, make_mm

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft", "ignore::FutureWarning")


def test_linear_cross_entropy_equals_full_logits_in_chunks():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    h = torch.randn(7, 8, generator=g, requires_grad=True)
    t = torch.randint(50, (7,), generator=g)
    ref = F.cross_entropy(head(h), t)
    (ref_grad,) = torch.autograd.grad(ref, h)
    for chunk in (1, 3, 7, 100):
        loss = linear_cross_entropy(h, head, t, chunk=chunk)
        (grad,) = torch.autograd.grad(loss, h)
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(grad, ref_grad)


def _loss_and_grads(model, feats, caps, lean: bool):
    model.zero_grad(set_to_none=True)
    _, loss = model(feats, caps, lean=lean)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("which", ["plain", "chat", "chat-lora"])
def test_lean_loss_and_gradients_equal_the_plain_step(which, tiny_llm_dir, tiny_chat_llm_dir, tiny_clip_dir,
                                                      tiny_data):
    lora = which.endswith("lora")
    kw = dict(lora=LoRAConfig(r=4, dropout=0.0), freeze_llm=False) if lora else {}
    model = make_mm(tiny_chat_llm_dir if which.startswith("chat") else tiny_llm_dir, make_aligner(tiny_clip_dir),
                    **kw).eval()
    if lora:  # LoRA B starts at zero; make the adapters change the output so their gradients mean something
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    # the fast path (pre-image KV computed once) turns itself off when the LLM has trainable weights
    assert model.prompt_cache_usable() == (not lora)
    caps = caption_ids(model, [s["captions"][i % 3] for i, s in enumerate(tiny_data["train"][:5])])
    caps[1] = caps[1][:3]  # rows of different lengths: right padding inside the batch
    feats = torch.randn(5, D_VISION, generator=torch.Generator().manual_seed(0))
    plain_loss, plain_grads = _loss_and_grads(model, feats, caps, lean=False)
    lean_loss, lean_grads = _loss_and_grads(model, feats, caps, lean=True)
    torch.testing.assert_close(lean_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == lean_grads.keys() and any("lora_" in n for n in lean_grads) == lora
    for n in plain_grads:
        torch.testing.assert_close(lean_grads[n], plain_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_lean_loss_under_bf16_autocast_matches_plain(tiny_chat_llm_dir, tiny_clip_dir, tiny_data):
    model = make_mm(tiny_chat_llm_dir, make_aligner(tiny_clip_dir)).eval()
    caps = caption_ids(model, [s["captions"][0] for s in tiny_data["train"][:4]])
    feats = torch.randn(4, D_VISION, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, lean = model(feats, caps)[1], model(feats, caps, lean=True)[1]
    assert lean.dtype == torch.float32
    torch.testing.assert_close(lean, plain.float(), rtol=2e-2, atol=0)


def test_matryoshka_prefix_is_the_renormalised_nested_embedding(tiny_llm_dir, tiny_clip_dir):
    model = make_mm(tiny_llm_dir, make_aligner(tiny_clip_dir), matryoshka=True)  # aligner mrl_dims [8, 16]
    z = F.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    nested = model.eval().nested(z, 8)
    torch.testing.assert_close(nested, torch.cat([F.normalize(z[:, :8], dim=-1), torch.zeros(64, 8)], 1))
    assert torch.equal(model.nested(z), z) and torch.equal(model.nested(z, 16), z)  # eval, no dim: the full z
    torch.manual_seed(0)
    drawn = model.train().nested(z)  # training: each row one of the MRL dims at random
    full = (drawn[:, 8:] != 0).any(-1)
    assert 0 < full.sum() < 64
    torch.testing.assert_close(drawn[full], z[full])
    torch.testing.assert_close(drawn[~full], nested[~full])
    make_mm(tiny_llm_dir, make_aligner(tiny_clip_dir)).train().nested(z) is z or pytest.fail("matryoshka off: z as is")
