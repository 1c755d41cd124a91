"""Benchmark 10: where the audio captions lose the signal, the aligned embedding z or Phase 2.

Needs the outputs of the default `dvc repro` (data/audio, models/aligner, models/llm) in --repo.

1. Linear probes (logistic regression on standardised inputs) read the first and last event's attributes
   of the val clips from the cached audio features and from z; beside each, the majority-class share.
2. A projector is trained on a perfect description of each clip instead of z (one-hot event, pitch,
   loudness, length and count per event slot) and the canonical captions, 300 steps of 64 on the train
   clips; greedy captions of those same clips then say whether the first event's pitch got through. Once on
   the single-event clips, once on all clips. If the oracle cannot get pitch through, the stand-in LLM's
   readout is the bottleneck, not the encoder or the alignment.
3. The fix the offline preset uses: a projector on z (all captions, 300 steps of 64), with the stand-in LLM
   frozen and with LoRA (r 8) on every linear layer of it; greedy captions of 600 training clips. ~5 minutes
   on 2 cores in all.

    python benchmarks/bench_caption_readout.py [--repo .] [--llm models/llm/tiny-qwen2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _common import ROOT

from mmalign.config import LLMConfig  # noqa: E402 (after _common puts src on the path)
from mmalign.data.synthetic_audio import EVENTS  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = LLMConfig().prompt_for("audio")  # the default audio prompt

KEYS = ("event", "pitch", "loudness", "duration", "count")


def oracle(events: list[dict]) -> torch.Tensor:
    """(256,) unit vector: number of events, then per slot one-hot event, pitch, loudness, length, count."""
    v = torch.zeros(256)
    v[len(events) - 1] = 1
    for s, e in enumerate(events):
        o = 3 + 16 * s
        v[o + EVENTS.index(e["event"])] = 1
        v[o + 7 + (e["pitch"] == "high")] = 1
        v[o + 9 + (e["loudness"] == "loud")] = 1
        v[o + 11 + (e["duration"] == "long")] = 1
        v[o + 13 + e["count"] - 1] = 1
    return v / v.norm()


def probe(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor) -> float:
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_val = (x_train - mu) / sd, (x_val - mu) / sd
    w = torch.zeros(x_train.shape[1], int(y_train.max()) + 1, requires_grad=True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x_train @ w + b, y_train) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return float(((x_val @ w + b).argmax(1) == y_val).float().mean())


def fit(model, x: torch.Tensor, draw, steps: int) -> float:
    """`steps` AdamW steps (lr 5e-3) on what trains in `model`; draw() -> (row indices, caption ids) of a batch.
    Returns the last step's loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(steps):
        rows, captions = draw()
        _, loss = model(None, captions, lean=True, z=x[rows], modality="audio")
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loss.item()


def greedy(model, x: torch.Tensor, chunk: int = 200) -> list[str]:
    """Greedy audio captions of the rows of x (n, d), `chunk` rows at a time."""
    with torch.no_grad():
        return [c for i in range(0, len(x), chunk)
                for c in model.generate_from_prefix(model.prefix_from_z(x[i:i + chunk]), PROMPT, max_new_tokens=40)]


def main() -> None:
    import datasets

    from mmalign.config import LoRAConfig
    from mmalign.data.features import load_features
    from mmalign.models.aligner import VisionTextAligner
    from mmalign.models.llm import MultimodalLLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT)
    parser.add_argument("--llm", default="models/llm/tiny-qwen2")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    repo = args.repo
    aligner = VisionTextAligner.from_pretrained(repo / "models/aligner")
    ds = datasets.load_from_disk(str(repo / "data/audio/dataset"))
    events = {s: [json.loads(e) for e in ds[s]["events"]] for s in ("train", "val")}
    feats = {s: load_features(repo / "data/audio/features", s).items.float() for s in ("train", "val")}
    with torch.no_grad():
        z = {s: aligner.embed_features(f, modality="audio").float() for s, f in feats.items()}

    print("1. linear probes on the val clips (accuracy; majority share)")
    for pos, where in ((0, "first"), (-1, "last")):
        for key in KEYS:
            vocab = sorted({str(e[pos][key]) for s in events for e in events[s]})
            y = {s: torch.tensor([vocab.index(str(e[pos][key])) for e in events[s]]) for s in events}
            majority = max(float((y["val"] == c).float().mean()) for c in range(len(vocab)))
            print(f"   {where} event {key:9s} majority {majority:.2f}   features {probe(feats['train'], y['train'], feats['val'], y['val']):.2f}"
                  f"   z {probe(z['train'], y['train'], z['val'], y['val']):.2f}")

    print(f"2. a projector trained on a perfect description instead of z ({args.steps} steps of 64, canonical captions)")
    for name, rows in (("single-event clips", [i for i, e in enumerate(events["train"]) if len(e) == 1]),
                       ("all clips", list(range(len(events["train"]))))):
        torch.manual_seed(0)
        model = MultimodalLLM(aligner, LLMConfig(model_name=str(repo / args.llm), prompts={"audio": PROMPT}))
        captions = [ds["train"][i]["captions"][0] for i in rows]
        ids = [model.tokenizer(c, add_special_tokens=False)["input_ids"] for c in captions]
        x = torch.stack([oracle(events["train"][i]) for i in rows])

        def draw():
            batch = torch.randint(len(rows), (64,)).tolist()
            return batch, [ids[i] for i in batch]
        loss = fit(model, x, draw, args.steps)
        generated = greedy(model, x, 256)
        pitch = [events["train"][i][0]["pitch"] for i in rows]
        said = sum(p in g.split()[:6] for p, g in zip(pitch, generated)) / len(rows)
        prior = max(pitch.count("low"), pitch.count("high")) / len(rows)
        print(f"   {name:18s} ({len(rows)}): first event's pitch in the caption {said:.2f} (prior {prior:.2f}), "
              f"exact captions {sum(g == c for g, c in zip(generated, captions)) / len(rows):.2f}, final loss {loss:.3f}")

    print(f"3. a projector on z, all captions ({args.steps} steps of 64): the stand-in LLM frozen vs with LoRA")
    first, n = events["train"][:600], 600
    for name, lora in (("frozen LLM", None), ("LoRA r 8, every linear layer", LoRAConfig(r=8, dropout=0.0, target_modules=ALL_LINEAR))):
        torch.manual_seed(0)
        extra = {"freeze_llm": False, "lora": lora} if lora else {}
        model = MultimodalLLM(aligner, LLMConfig(model_name=str(repo / args.llm), prompts={"audio": PROMPT}, **extra))
        ids = [[model.tokenizer(c, add_special_tokens=False)["input_ids"] for c in caps] for caps in ds["train"]["captions"]]
        gen = torch.Generator().manual_seed(0)

        def draw():
            batch = torch.randint(len(ids), (64,), generator=gen).tolist()
            pick = torch.randint(3, (64,), generator=gen).tolist()
            return batch, [ids[i][p % len(ids[i])] for i, p in zip(batch, pick)]
        loss = fit(model, z["train"], draw, args.steps)
        generated = greedy(model, z["train"][:n])
        pitch = sum(e[0]["pitch"] in g.split()[:6] for e, g in zip(first, generated)) / n
        kind = sum(e[0]["event"].split()[0] in " ".join(g.split(",")[0].split()[:6]) for e, g in zip(first, generated)) / n
        said = {w: sum(w in g.split() for g in generated) / n for w in ("low", "beep", "knock")}
        print(f"   {name:30s}: first event's pitch in the caption {pitch:.2f}, its kind {kind:.2f}; share of captions "
              f"saying " + ", ".join(f"{w} {v:.2f}" for w, v in said.items()) + f"; final loss {loss:.3f}")


if __name__ == "__main__":
    main()
