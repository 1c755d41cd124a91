"""Benchmark 6 (GPU): real-size architectures with random weights in bf16, for a lent accelerator.

- CLIP ViT-B/32 vision tower (openai/clip-vit-base-patch32's config values, written out) ->
  extraction images/s at 224 px.
- Qwen2.5-1.5B (its config values, written out) frozen, a projector trained through it:
  prefix k=10 + ~90 caption tokens (seq 100), batch 32 -> projector-training tokens/s.
- The Phase 2 step of bench_phase2.py at Qwen2.5-1.5B shape in bf16 (Qwen chat template with its
  default system prompt, batch 32, k=10, COCO-length captions): A = plain `llm(inputs_embeds, labels)`,
  B = the project's lean step; loss, peak memory of the step, caption tokens/s, and the fraction of
  peak of the FLOPs each executes (bench_phase2.step_flops).
- A bf16 matmul peak measured on the same device (8192^3 matmuls), and the fraction of it each
  workload reaches.

FLOP estimates (Kaplan et al. 2020, "6N" rule): a forward pass costs ~2 * params FLOPs per token
(one multiply-add per weight). Training costs ~6 * params per token (forward 2, backward 4: grads
w.r.t. activations and w.r.t. weights). Here the LLM is frozen, so the weight-gradient half of the
backward is skipped, but gradients still flow back through every layer to the prefix: ~4 * params
per token. Attention's T^2 term is left out (small at seq 100). The ViT counts its 50 tokens
(49 patches + CLS) per image.

    python benchmarks/gpu.py            # on a GPU; < 8 minutes on one H100
    python benchmarks/gpu.py --dry-run  # CPU, tiny sizes: checks that it imports and builds
"""

from __future__ import annotations

import argparse
import time

import torch

CLIP_B32 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                patch_size=32, image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5)
QWEN25_15B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu")
TINY = {"clip": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        "qwen": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=1000)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, device: torch.device, iters: int, warmup: int = 3) -> float:
    """Seconds per call of fn, after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def matmul_peak(device: torch.device, n: int, iters: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n ** 3 / bench(lambda: a @ b, device, iters)


def phase2_rows(device: torch.device, dry: bool, peak: float, iters: int) -> list[tuple[str, str, str]]:
    """bench_phase2's plain (A) vs lean (B) step at Qwen2.5-1.5B shape in bf16, one row each."""
    import bench_phase2 as p2

    shape = {**QWEN25_15B, **(TINY["qwen"] if dry else {})}
    mm, z, caps = p2.build(shape["num_hidden_layers"], shape, batch=2 if dry else 32, device=str(device),
                           dtype="bfloat16")
    loss = {w: p2.step(mm, z, caps, w) for w in "AB"}
    labels = sum(len(c) + 1 for c in caps)
    rows = []
    for w, name in (("A", "plain llm(inputs_embeds, labels)"), ("B", "lean step")):
        t = bench(lambda: p2.step(mm, z, caps, w), device, iters)
        mem = ""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            p2.step(mm, z, caps, w)
            mem = f", step peak {(torch.cuda.max_memory_allocated() - base) / 2**20:,.0f} MiB"
        flops = p2.step_flops(mm, caps, w) / t
        rows.append((f"Phase 2 step {w}: {name} (Qwen2.5-1.5B frozen, bf16, batch {len(caps)}, k={p2.K})",
                     f"{labels / t:,.0f} caption tokens/s ({flops / 1e12:.1f} TFLOP/s executed{mem}; "
                     f"loss {loss[w]:.4f})", f"{flops / peak:.2f}"))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: check it builds and runs")
    args = ap.parse_args(argv)
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --dry-run")
    dtype = torch.bfloat16
    clip_cfg = CLIPVisionConfig(**{**CLIP_B32, **(TINY["clip"] if dry else {})})
    qwen_cfg = Qwen2Config(**{**QWEN25_15B, **(TINY["qwen"] if dry else {})})
    img_batch, k, seq, batch = (4, 10, 100, 2) if dry else (256, 10, 100, 32)
    iters = 2 if dry else 20
    torch.manual_seed(0)

    peak = matmul_peak(device, 256 if dry else 8192, 2 if dry else 50)

    vit = CLIPVisionModel(clip_cfg).to(device, dtype).eval().requires_grad_(False)
    vit_params = sum(p.numel() for p in vit.parameters())
    px = torch.randn(img_batch, 3, clip_cfg.image_size, clip_cfg.image_size, device=device, dtype=dtype)
    with torch.inference_mode():
        t_vit = bench(lambda: vit(pixel_values=px), device, iters)
    vit_tokens = (clip_cfg.image_size // clip_cfg.patch_size) ** 2 + 1
    img_s = img_batch / t_vit
    vit_flops = 2 * vit_params * vit_tokens * img_s
    del vit

    llm = Qwen2ForCausalLM(qwen_cfg).to(device, dtype).eval().requires_grad_(False)
    llm_params = sum(p.numel() for p in llm.parameters())  # tied embeddings counted once
    H = qwen_cfg.hidden_size
    projector = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(),
                                    torch.nn.Linear(1024, k * H)).to(device, dtype)
    opt = torch.optim.AdamW(projector.parameters(), lr=1e-4)
    z = torch.randn(batch, 512, device=device, dtype=dtype)
    ids = torch.randint(qwen_cfg.vocab_size, (batch, seq - k), device=device)
    labels = torch.cat([torch.full((batch, k), -100, device=device), ids], 1)

    def step() -> None:
        prefix = projector(z).view(batch, k, H)  # (B, k, H)
        embeds = torch.cat([prefix, llm.get_input_embeddings()(ids)], 1)  # (B, seq, H)
        loss = llm(inputs_embeds=embeds, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_step = bench(step, device, iters)
    tok_s = batch * seq / t_step
    # tied embeddings: the lookup is free, the same matrix as lm_head is a matmul, so params count once
    proj_flops = 4 * llm_params * tok_s

    rows = [("bf16 matmul peak", f"{peak / 1e12:.1f} TFLOP/s", "1.00"),
            ("extraction (ViT-B/32, 224 px)", f"{img_s:,.0f} images/s ({vit_flops / 1e12:.1f} TFLOP/s)",
             f"{vit_flops / peak:.2f}"),
            (f"projector training (Qwen2.5-1.5B frozen, k={k}, seq {seq}, batch {batch})",
             f"{tok_s:,.0f} tokens/s ({proj_flops / 1e12:.1f} TFLOP/s)", f"{proj_flops / peak:.2f}")]
    rows += phase2_rows(device, dry, peak, iters)
    name = "CPU dry run (tiny sizes, numbers meaningless)" if dry else torch.cuda.get_device_name()
    print(f"device: {name}; torch {torch.__version__}; ViT params {vit_params / 1e6:.1f} M, "
          f"LLM params {llm_params / 1e6:.1f} M")
    print("| workload | measured | fraction of peak |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
