"""Figures logged to MLflow: training curves, R@1 vs Matryoshka dim, caption gallery."""

from __future__ import annotations

import textwrap
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: stages run without a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def loss_curve(steps: pd.DataFrame, title: str, columns: Sequence[str] = ("loss",)) -> Any:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for col in columns:
        if col in steps:
            ax.plot(steps["step"], steps[col], label=col, lw=1)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def recall_by_dim(rows: pd.DataFrame) -> Any:
    """rows: columns dim, i2t_R@1, t2i_R@1, chance_i2t_R@1, chance_t2i_R@1."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for d, style in (("i2t", "o-"), ("t2i", "s-")):
        ax.plot(rows["dim"], rows[f"{d}_R@1"], style, label=f"{d} R@1")
        ax.plot(rows["dim"], rows[f"chance_{d}_R@1"], ":", color="grey", label=f"{d} chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(rows["dim"], [str(d) for d in rows["dim"]])
    ax.set(xlabel="embedding dim (Matryoshka prefix)", ylabel="test R@1", title="Retrieval vs embedding size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def cider_by_dim(rows: pd.DataFrame, matryoshka: bool) -> Any:
    """rows: columns dim, CIDEr, blind_CIDEr (one projector captioning from each Matryoshka prefix of z)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(rows["dim"], rows["CIDEr"], "o-", label="trained")
    ax.plot(rows["dim"], rows["blind_CIDEr"], ":", color="grey", label="blind (no image)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(rows["dim"], [str(d) for d in rows["dim"]])
    trained = "projector trained on every prefix" if matryoshka else "projector trained on the full dim only"
    ax.set(xlabel="embedding dim (Matryoshka prefix)", ylabel="test CIDEr", title=f"Captioning vs embedding size\n({trained})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def caption_gallery(images: Sequence[Any], generated: Sequence[str], blind: Sequence[str],
                    references: Sequence[Sequence[str]], cols: int = 4) -> Any:
    """Grid of test images with the trained caption, the blind caption and one reference."""
    n = len(images)
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im, gen, bl, refs in zip(axes.flat, images, generated, blind, references):
        ax.imshow(im, interpolation="nearest")
        wrap = lambda s: "\n".join(textwrap.wrap(s, 44)[:3])  # noqa: E731
        ax.set_title(f"model: {wrap(gen)}\nblind: {wrap(bl)}\nref: {wrap(refs[0])}", fontsize=7, loc="left")
    fig.tight_layout()
    return fig


def retrieval_examples(queries: Sequence[str], images: Sequence[Sequence[Any]], correct: Sequence[Sequence[bool]]) -> Any:
    """For each text query, its top-k images; the correct one framed in green."""
    k = max(len(r) for r in images)
    fig, axes = plt.subplots(len(queries), k, figsize=(1.8 * k, 2.1 * len(queries)), squeeze=False)
    for r, (q, ims, ok) in enumerate(zip(queries, images, correct)):
        for c in range(k):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(ims):
                ax.imshow(ims[c], interpolation="nearest")
                for s in ax.spines.values():
                    s.set_edgecolor("limegreen" if ok[c] else "lightgrey")
                    s.set_linewidth(4 if ok[c] else 1)
        axes[r, 0].set_title("\n".join(textwrap.wrap(q, 60)[:2]), fontsize=7, loc="left")
    fig.tight_layout()
    return fig
