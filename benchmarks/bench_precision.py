"""Benchmark: frozen-encoder extraction under `prepare.mixed_precision` bf16 vs float32.

MiniLM (the default text encoder, the largest cost of both prepare stages) encodes the same captions of
the default synthetic data as `prepare` does (chunks of TEXT_CHUNK, batch 64) in float32 and under bf16
autocast, back to back, the order alternating between rounds; the ratio is the median of the rounds'
ratios. Also printed: the smallest cosine between a caption's float32 and bf16 embeddings, and what
`auto` resolves to here. `auto` picks bf16 only on a CPU with AMX or AVX512-BF16 (or a bf16 GPU):
elsewhere CPU bf16 is emulated and slower than float32.

    python benchmarks/bench_precision.py
"""

from __future__ import annotations

import statistics

from _common import Row, default_params, print_rows, timed

N_CAPTIONS = 2048
ROUNDS = 5


def run() -> dict:
    import torch

    from mmalign.data.features import TEXT_CHUNK, encode_captions
    from mmalign.data.synthetic import generate_synthetic
    from mmalign.hub import MINILM_ID
    from mmalign.models.encoders import FrozenTextEncoder
    from mmalign.training.distributed import autocast, resolve_precision

    prep = default_params()["prepare"]
    rows = generate_synthetic(0, N_CAPTIONS // prep["captions_per_image"] + 1, 0, 0, image_size=prep["image_size"],
                              captions_per_image=prep["captions_per_image"], max_objects=prep["max_objects"])["train"]
    captions = [c for r in rows for c in r["captions"]][:N_CAPTIONS]
    text = FrozenTextEncoder(MINILM_ID)
    cpu = torch.device("cpu")

    def encode(precision: str) -> torch.Tensor:
        with autocast(cpu, precision):
            return torch.cat(encode_captions(text, captions))  # as prepare encodes them

    out = {p: encode(p) for p in ("none", "bf16")}  # warm-up, and the embeddings compared
    times: dict[str, list[float]] = {"none": [], "bf16": []}
    for r in range(ROUNDS):
        for p in (("none", "bf16") if r % 2 == 0 else ("bf16", "none")):
            times[p].append(timed(lambda: encode(p))[0])
    ratios = [a / b for a, b in zip(times["none"], times["bf16"])]
    cos = torch.nn.functional.cosine_similarity(out["none"], out["bf16"]).min().item()
    note = (f"{N_CAPTIONS} default synthetic captions, MiniLM-L6, chunks of {TEXT_CHUNK}, batch 64, torch threads "
            f"{torch.get_num_threads()}; median of {ROUNDS} rounds' ratios (range {min(ratios):.2f}-{max(ratios):.2f}); "
            f"min cosine float32 vs bf16 {cos:.6f}; auto resolves to {resolve_precision(cpu, 'auto')} here.")
    rate = {p: N_CAPTIONS / statistics.median(t) for p, t in times.items()}
    return {"rows": [Row("Extraction precision (text)", "float32", rate["none"], "bf16 autocast", rate["bf16"],
                         "captions/s", None, ratio=statistics.median(ratios), note=note)], "min_cosine": cos}


if __name__ == "__main__":
    res = run()
    print_rows(res["rows"])
    for r in res["rows"]:
        print(r.note)
