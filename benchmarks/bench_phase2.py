"""Benchmark 7: one Phase 2 training step at Qwen2.5-0.5B shape, plain vs the project's lean step.

A Qwen2ForCausalLM with Qwen2.5-0.5B's published config values (written out below; random weights,
float32, frozen), a Qwen-style ChatML template with its default system prompt (the tokenizer is a
small BPE trained here; ids stay far below the 151,936-row vocabulary), batch 8, k=10 prefix tokens,
captions of COCO length (12-20 token ids, random). Both steps run the same projector forward and
backward through the LLM to the prefix:

- A: plain `llm(inputs_embeds=..., attention_mask=..., labels=...)` on [system+user][prefix][prompt][caption].
- B: `MultimodalLLM.lean_loss`: the pre-image prompt's KV once at batch 1 without grad, the LM head
  only at labelled positions, chunked fused cross-entropy.

Speed: A and B alternate for `--rounds` rounds (after one warm-up each); tokens/s are caption tokens
(the trained targets) per second, medians. Memory: each step once in a fresh subprocess (no warm-up);
the step's peak is Linux's peak RSS (VmHWM, reset through /proc/self/clear_refs just before the step)
minus the RSS just before it, so the model's weights and the inputs are not counted.

    python benchmarks/bench_phase2.py --write         # 24 layers, as Qwen2.5-0.5B (~3 min); into RESULTS.md
    python benchmarks/bench_phase2.py --layers 6      # fewer decoder layers (say so when reporting)
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, Row, format_table, print_rows

MARK = "<!-- bench_phase2 -->"  # RESULTS.md keeps this section between two marks (run_all.py carries it over)

QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu")
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5's template, tools left out: a default system turn unless the conversation brings one.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BATCH, K, D_ALIGN = 8, 10, 256
CAPTION_TOKENS = (12, 20)  # COCO captions: ~10-14 words


def build(layers: int, shape: dict | None = None, batch: int = BATCH, device: str = "cpu", dtype: str = "float32"):
    """MultimodalLLM around a random Qwen2-family LLM of `shape` (default Qwen2.5-0.5B's) with `layers`
    decoder layers; returns (model, z (batch, d_align), captions: token-id lists)."""
    import torch
    import torch.nn.functional as F
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mmalign.models.aligner import VisionTextAligner
    from mmalign.config import AlignmentConfig, LLMConfig
    from mmalign.data.synthetic import generate_synthetic
    from mmalign.models.llm import MultimodalLLM
    from mmalign.standins.tiny_llm import build_tokenizer

    texts = [c for r in generate_synthetic(0, 300, 0, 0, captions_per_image=3)["train"] for c in r["captions"]]
    shape = {**(shape or QWEN25_05B), "num_hidden_layers": layers}
    vocab = min(2000, shape["vocab_size"] // 2)  # prompt ids from the tokenizer, caption ids above them
    tok = build_tokenizer(texts + [QWEN_SYSTEM, "Describe this image:"] * 50, vocab, chat_template=True)
    tok.chat_template = QWEN_TEMPLATE
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(**shape)).to(device, getattr(torch, dtype))
    aligner = VisionTextAligner(AlignmentConfig(vision_model_name="unused", text_model_name="unused", vision_dim=8,
                                                text_dim=8, d_align=D_ALIGN, hidden_dim=16, mrl_dims=[D_ALIGN]))
    mm = MultimodalLLM(aligner, LLMConfig(model_name="unused", k=K, projector_hidden=512, dtype=dtype), llm=llm,
                       tokenizer=tok).eval()
    g = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(batch, D_ALIGN, generator=g), dim=-1).to(device)
    lo, hi = CAPTION_TOKENS
    caps = [torch.randint(vocab, shape["vocab_size"], (int(n),), generator=g).tolist()
            for n in torch.randint(lo, hi + 1, (batch,), generator=g)]
    return mm, z, caps


def step_flops(mm, caps, which: str) -> float:
    """FLOPs a step executes (Kaplan et al.'s 2N per token forward; the LLM is frozen, so its backward is
    only the 2N of the input gradients): A runs every padded position through the layers and the head;
    B runs the pre-image prompt forward once at batch 1, the rest of each row, and the head on labels."""
    layer_params = sum(p.numel() for p in mm.llm.get_decoder().layers.parameters())
    head = mm.llm.get_output_embeddings().weight.numel()
    before, after = mm.prompt_pieces(mm.cfg.prompt)
    n_rows, labels = len(caps), sum(len(c) + 1 for c in caps)
    T = len(before) + K + len(after) + max(len(c) for c in caps) + 1  # padded row length of plain
    if which == "A":
        return 4 * (layer_params + head) * n_rows * T
    return 2 * layer_params * len(before) + 4 * layer_params * n_rows * (T - len(before)) + 4 * head * labels


def step(mm, z, caps, which: str) -> float:
    """One forward + backward to the projector's weights; returns the loss."""
    mm.projector.zero_grad(set_to_none=True)
    prefix = mm.projector(z)  # (B, k, H)
    loss = mm.llm(**mm.build_inputs(prefix, caps)).loss if which == "A" else mm.lean_loss(prefix, caps)
    loss.backward()
    return float(loss.detach())


def _rss_kb(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1])


def memory_of(which: str, layers: int) -> dict:
    """Peak RSS of one step above the RSS before it, in MB (run in a fresh process)."""
    import gc

    mm, z, caps = build(layers)
    gc.collect()
    before = _rss_kb("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
    step(mm, z, caps, which)
    return {"peak_mb": (_rss_kb("VmHWM:") - before) / 1024, "before_mb": before / 1024}


def run(layers: int = 24, rounds: int = 5) -> dict:
    import torch

    mm, z, caps = build(layers)
    before, after = mm.prompt_pieces(mm.cfg.prompt)
    n_tok = sum(len(c) + 1 for c in caps)  # caption tokens + end token: the labelled targets
    seq = len(before) + K + len(after) + max(len(c) for c in caps) + 1
    loss = {w: step(mm, z, caps, w) for w in "AB"}  # warm-up, and the losses to compare
    times: dict[str, list[float]] = {"A": [], "B": []}
    for _ in range(rounds):
        for w in "AB":
            t0 = time.perf_counter()
            step(mm, z, caps, w)
            times[w].append(time.perf_counter() - t0)
    del mm
    mem = {}
    for w in "AB":
        out = subprocess.run([sys.executable, __file__, "--memory-of", w, "--layers", str(layers)],
                             capture_output=True, text=True, check=True)
        mem[w] = json.loads(out.stdout.strip().splitlines()[-1])
    rel = abs(loss["B"] - loss["A"]) / abs(loss["A"])
    tps = {w: n_tok / statistics.median(times[w]) for w in "AB"}
    shape = (f"Qwen2.5-0.5B shape, {layers} of 24 decoder layers" if layers != 24 else "Qwen2.5-0.5B shape (24 layers)")
    common = (f"{shape}, vocab 151,936, random weights, float32, CPU ({torch.get_num_threads()} threads); batch {BATCH}, "
              f"k={K}, {len(before)} pre-image chat tokens (default system prompt), {len(after)} after, captions "
              f"{min(map(len, caps))}-{max(map(len, caps))} tokens; padded length {seq}")
    rows = [
        Row("7. Phase 2 step loss", "plain", loss["A"], "lean", loss["B"], "nats", None,
            note=f"{common}; relative difference {rel:.2e} (target <= 1e-3: {'met' if rel <= 1e-3 else 'NOT met'})"),
        Row("7. Phase 2 step memory", "plain", mem["A"]["peak_mb"], "lean", mem["B"]["peak_mb"], "MB", 0.6,
            at_most=True, note=f"peak RSS of one step above the RSS before it (model and inputs: "
                               f"{mem['A']['before_mb']:,.0f} MB), each in a fresh process"),
        Row("7. Phase 2 step speed", "plain", tps["A"], "lean", tps["B"], "caption tokens/s", 1.3,
            note=f"medians of {rounds} alternating rounds; step times A "
                 f"{', '.join(f'{t:.2f}' for t in times['A'])} s, B {', '.join(f'{t:.2f}' for t in times['B'])} s"),
    ]
    return {"rows": rows, "rel_loss_diff": rel}


def write_results(rows: list[Row], command: str, started: datetime.datetime) -> None:
    """Replace the section between the marks in benchmarks/RESULTS.md (or append it)."""
    import run_all

    notes = "\n".join(f"- **{r.name}**: {r.note}" for r in rows)
    section = (f"{MARK}\n## 7. Phase 2 step at real vocabulary size\n\nMachine: {run_all.machine()}\n"
               f"Date: {started:%Y-%m-%d %H:%M %Z}\nCommand: `{command}` (from the repo root)\n\n"
               f"{format_table(rows)}\n\n{notes}\n{MARK}\n")
    path = ROOT / "benchmarks" / "RESULTS.md"
    text = path.read_text() if path.exists() else ""
    parts = text.split(MARK)
    text = parts[0].rstrip() + "\n\n" + section + (parts[2].lstrip("\n") if len(parts) >= 3 else "")
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (Qwen2.5-0.5B has 24)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating timed rounds of A and B")
    ap.add_argument("--write", action="store_true", help="write the numbers into benchmarks/RESULTS.md")
    ap.add_argument("--memory-of", choices=["A", "B"], help=argparse.SUPPRESS)  # the subprocess's job
    args = ap.parse_args(argv)
    if args.memory_of:
        print(json.dumps(memory_of(args.memory_of, args.layers)))
        return
    started = datetime.datetime.now().astimezone()
    res = run(args.layers, args.rounds)
    print_rows(res["rows"])
    for r in res["rows"]:
        print(f"- **{r.name}**: {r.note}")
    if args.write:
        write_results(res["rows"], "python benchmarks/bench_phase2.py " + " ".join(argv or sys.argv[1:]), started)


if __name__ == "__main__":
    main()
