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
    assert list(model.projector.nested_in) == ["8"]  # one input map per dim below the full one
    z = F.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    padded = torch.cat([F.normalize(z[:, :8], dim=-1), torch.zeros(64, 8)], 1)
    with torch.no_grad():
        torch.testing.assert_close(model.nested(z, 8), padded)  # the map starts as zero padding
        assert torch.equal(model.train().nested(z), z) and torch.equal(model.nested(z, 16), z)  # no dim: the full z
        model.projector.nested_in["8"].weight.normal_()
        assert not torch.allclose(model.nested(z, 8), padded)  # ... and is learned
    full_only = make_mm(tiny_llm_dir, make_aligner(tiny_clip_dir))
    assert not len(full_only.projector.nested_in)
    torch.testing.assert_close(full_only.nested(z, 8), padded)  # a full-dim projector: zero padding
    full_only.train().nested(z) is z or pytest.fail("no dim: z as is")


@pytest.mark.parametrize("lean", [True, False])
def test_matryoshka_loss_is_full_dim_loss_plus_nested_loss_and_only_the_full_dim_trains_the_projector(
        lean, tiny_llm_dir, tiny_clip_dir, tiny_data):
    model = make_mm(tiny_llm_dir, make_aligner(tiny_clip_dir), matryoshka=True).train()
    with torch.no_grad():
        model.projector.nested_in["8"].weight.normal_()  # not the zero padding the full path would also see
    caps = caption_ids(model, [s["captions"][i % 3] for i, s in enumerate(tiny_data["train"][:5])])
    caps[1] = caps[1][:3]
    feats = torch.randn(5, D_VISION, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = model.aligner.vision_adapter(feats)
    net = dict(model.projector.net.named_parameters())
    full = model.lean_loss(model.projector(z), caps)
    full_grads = torch.autograd.grad(full, list(net.values()))
    torch.manual_seed(1)
    nested = model.lean_loss(model.nested_prefix(z), caps)
    assert not any(p.grad is not None for p in net.values())
    torch.manual_seed(1)  # the same draw of dims inside forward
    model.zero_grad(set_to_none=True)
    _, loss = model(feats, caps, lean=lean)
    torch.testing.assert_close(loss, full + nested, rtol=1e-5, atol=1e-6)
    loss.backward()
    for (n, p), g in zip(net.items(), full_grads):  # the shared projector: the full-dim loss's gradient only
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7, msg=n)
    assert model.projector.nested_in["8"].weight.grad.abs().sum() > 0  # the nested loss trains the dim-8 map
    model.eval()
    torch.testing.assert_close(model(feats, caps, lean=lean)[1], full.detach(), rtol=1e-5, atol=1e-6)  # eval: full dim


def test_matryoshka_projector_round_trip(tiny_llm_dir, tiny_clip_dir, tmp_path):
    from mmalign.models.llm import MultimodalLLM

    aligner = make_aligner(tiny_clip_dir)
    model = make_mm(tiny_llm_dir, aligner, matryoshka=True)
    with torch.no_grad():
        model.projector.nested_in["8"].weight.normal_()
    model.save_pretrained(tmp_path)
    loaded = MultimodalLLM.from_pretrained(tmp_path, aligner)
    feats = torch.randn(3, D_VISION, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.prefix_from_features(feats, 8), model.prefix_from_features(feats, 8))
