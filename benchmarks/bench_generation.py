"""Benchmark 3: batched KV-cache generation (batch 32) vs one image at a time.

The tiny Qwen2 (default TinyLLMSpec architecture, fewer pretraining steps: speed does not depend
on training) behind a MultimodalLLM with k=16 prefix tokens; random prefixes stand in for images.
Tokens counted per row up to and including its first end token (padding after it excluded).

    python benchmarks/bench_generation.py
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from _common import Row, default_params, print_rows, timed

N_IMAGES = 64  # prefixes generated in each mode
BATCH = 32
PRETRAIN_STEPS = 60  # default 300; enough for the model to end its captions
N_CAPTION_IMAGES = 1000  # synthetic images whose captions pretrain the LLM (3000 captions)


def run() -> dict:
    import torch
    import torch.nn.functional as F

    from mmalign.models.aligner import VisionTextAligner
    from mmalign.config import AlignmentConfig, LLMConfig
    from mmalign.data.synthetic import generate_synthetic
    from mmalign.models.llm import MultimodalLLM
    from mmalign.standins.tiny_llm import TinyLLMSpec, build_tiny_llm, caption_documents

    p = default_params()
    proj, align, max_new = p["project"], p["align"], p["evaluate"]["max_new_tokens"]
    caps = [r["captions"] for r in generate_synthetic(0, N_CAPTION_IMAGES, 0, 0, captions_per_image=3)["train"]]
    with tempfile.TemporaryDirectory() as tmp:
        llm_dir = Path(tmp) / "tiny-qwen2"
        build_tiny_llm(caption_documents(caps), llm_dir, dataclasses.replace(TinyLLMSpec(), steps=PRETRAIN_STEPS),
                       progress=False)
        torch.manual_seed(0)
        aligner = VisionTextAligner(AlignmentConfig(
            vision_model_name="unused", text_model_name="unused", vision_dim=2048, text_dim=8,
            d_align=align["d_align"], hidden_dim=align["hidden_dim"], mrl_dims=align["mrl_dims"]))
        mm = MultimodalLLM(aligner, LLMConfig(model_name=str(llm_dir), k=proj["k"],
                                              projector_hidden=proj["projector_hidden"])).eval()
    z = F.normalize(torch.randn(N_IMAGES, align["d_align"], generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.no_grad():
        prefix = mm.projector(z)  # (N, k, H)

    ends = {mm.end_id, mm.tokenizer.eos_token_id}
    captured: list[torch.Tensor] = []
    generate = mm.llm.generate

    def spy(*args, **kwargs):  # keep the ids generate_from_prefix decodes, to count them
        out = generate(*args, **kwargs)
        captured.append(out)
        return out

    mm.llm.generate = spy

    def tokens() -> int:
        n = 0
        for out in captured:
            for row in out.tolist():
                stop = next((i for i, t in enumerate(row) if t in ends), None)
                n += len(row) if stop is None else stop + 1
        captured.clear()
        return n

    def gen(batch: int) -> int:
        for i in range(0, N_IMAGES, batch):
            mm.generate_from_prefix(prefix[i:i + batch], max_new_tokens=max_new)
        return tokens()

    gen(BATCH)  # warm-up
    t_one, n_one = timed(lambda: gen(1))
    t_batch, n_batch = timed(lambda: gen(BATCH))
    note = (f"{N_IMAGES} random prefixes (k={proj['k']}), greedy, max_new_tokens={max_new}; tiny Qwen2 "
            f"pretrained {PRETRAIN_STEPS} steps (default 300); tokens: {n_one} one at a time, {n_batch} batched "
            f"(mean {n_batch / N_IMAGES:.1f} per caption).")
    return {"rows": [Row("3. Generation", "batch 1", n_one / t_one, f"batch {BATCH}", n_batch / t_batch, "tokens/s",
                         4.0, note=note)]}


if __name__ == "__main__":
    res = run()
    print_rows(res["rows"])
    for r in res["rows"]:
        print(r.note)
