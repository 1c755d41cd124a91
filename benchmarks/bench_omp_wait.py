"""Benchmark: how OpenMP threads wait between parallel regions (mmalign.entry.process_env's choice).

The stand-in models are small, so a training step is hundreds of short parallel regions. Between them
libgomp's threads spin without bound (its default), sleep at once (OMP_WAIT_POLICY=PASSIVE), or spin a
bounded count and then sleep (GOMP_SPINCOUNT). Each policy runs the same workload (the default tiny Qwen2's
pretraining steps, four length-sorted pieces of random tokens) in a fresh process, alone and as two processes at once (a queued
`dvc exp run --jobs 2`, a test run beside a pipeline). All policies run in this one invocation, so the ratios
are side by side. ~2 minutes on 2 cores.

    python benchmarks/bench_omp_wait.py [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

POLICIES = {"unbounded spin (libgomp default)": {},
            "GOMP_SPINCOUNT=3000 (mmalign stages)": {"GOMP_SPINCOUNT": "3000"},
            "OMP_WAIT_POLICY=PASSIVE (test suite)": {"OMP_WAIT_POLICY": "PASSIVE"}}

WORKLOAD = """
import sys, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
torch.manual_seed(0)
model = Qwen2ForCausalLM(Qwen2Config(vocab_size=600, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for _ in range(int(sys.argv[1])):
    for length in (20, 30, 45, 90):  # a batch of 64 as four length-sorted pieces, as the stand-in pretrains
        ids = torch.randint(600, (16, length))
        model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
"""


def run(env: dict[str, str], steps: int, copies: int) -> float:
    """Wall seconds until `copies` processes of the workload have all finished."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", WORKLOAD, str(steps)], env={**base, **env})
             for _ in range(copies)]
    if any(p.wait() for p in procs):
        raise SystemExit("the workload failed")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, {args.steps} steps per process\n")
    print(f"{'policy':40s} {'alone':>8s} {'two at once':>12s}")
    times = {}
    for name, env in POLICIES.items():
        times[name] = run(env, args.steps, 1), run(env, args.steps, 2)
        print(f"{name:40s} {times[name][0]:7.1f}s {times[name][1]:11.1f}s", flush=True)
    passive = times["OMP_WAIT_POLICY=PASSIVE (test suite)"]
    for name, (alone, two) in times.items():
        print(f"{name:40s} alone {passive[0] / alone:4.2f}x passive's speed, two at once {passive[1] / two:4.2f}x")


if __name__ == "__main__":
    main()
