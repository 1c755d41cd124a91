"""Figures logged to MLflow: training curves, R@1 vs Matryoshka dim, caption galleries (images, or audio
clips as spectrograms)."""

from __future__ import annotations

import textwrap
from typing import Any, Sequence

import sys

import matplotlib

if "ipykernel" not in sys.modules:  # stages and the CLI draw headless; a notebook keeps its inline backend
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
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


def recall_by_dim(rows: pd.DataFrame, letter: str = "i", noun: str = "image") -> Any:
    """rows: columns dim, i2t_R1, t2i_R1, chance_i2t_R1, chance_t2i_R1 (letter "i"; audio: a2t_R1, ...)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for d, style in ((f"{letter}2t", "o-"), (f"t2{letter}", "s-")):
        ax.plot(rows["dim"], rows[f"{d}_R1"], style, label=f"{d} R@1")
        ax.plot(rows["dim"], rows[f"chance_{d}_R1"], ":", color="grey", label=f"{d} chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(rows["dim"], [str(d) for d in rows["dim"]])
    ax.set(xlabel="embedding dim (Matryoshka prefix)", ylabel="test R@1", title=f"{noun}-text retrieval vs embedding size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def cider_by_dim(rows: pd.DataFrame, matryoshka: bool, noun: str = "image") -> Any:
    """rows: columns dim, CIDEr, blind_CIDEr (one projector captioning from each Matryoshka prefix of z)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(rows["dim"], rows["CIDEr"], "o-", label="trained")
    ax.plot(rows["dim"], rows["blind_CIDEr"], ":", color="grey", label=f"blind (no {noun})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(rows["dim"], [str(d) for d in rows["dim"]])
    trained = "projector trained on every prefix" if matryoshka else "projector trained on the full dim only"
    ax.set(xlabel="embedding dim (Matryoshka prefix)", ylabel="test CIDEr", title=f"{noun} captioning vs embedding size\n({trained})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def wrap(text: str, width: int, max_lines: int) -> str:
    """Wrapped to `width` columns; past `max_lines`, cut at a word and ended with an ellipsis."""
    lines = textwrap.wrap(text, width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:width - 1].rstrip() + "\u2026"
    return "\n".join(lines)


def caption_gallery(images: Sequence[Any], generated: Sequence[str], blind: Sequence[str],
                    references: Sequence[Sequence[str]], cols: int = 4, noun: str = "image") -> Any:
    """Grid of test images (or audio spectrograms), each with the trained caption (bold, blue) and one reference
    (grey, italic). The blind captioner's caption (no input) is the same for every item: it is shown once, on
    top. Captions longer than 5 lines end in an ellipsis; eval/examples/*captions.csv has them in full."""
    n = len(images)
    rows = max(1, -(-n // cols))
    height = 4.9 * rows + 1.4  # inches: each row's image with up to 5 caption lines above and below
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, height), squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 1.5 / height, bottom=0.9 / height, hspace=0.55, wspace=0.1)
    for ax in axes.flat:
        ax.axis("off")
    one_blind = bool(blind) and len(set(blind)) == 1
    for ax, im, gen, bl, refs in zip(axes.flat, images, generated, blind, references):
        ax.imshow(im, interpolation="nearest", aspect="auto" if noun != "image" else None)
        ax.text(0, 1.02, "reference: " + wrap(refs[0], 50, 5), transform=ax.transAxes, va="bottom", fontsize=7,
                color="0.35", style="italic")
        below = "model: " + wrap(gen, 48, 5) + ("" if one_blind else "\nblind: " + wrap(bl, 48, 2))
        ax.text(0, -0.02, below, transform=ax.transAxes, va="top", fontsize=7.5, color="tab:blue", weight="bold")
    if one_blind:
        fig.suptitle(f"blind captioner (same LLM and prompt, no {noun}), for every {noun}:\n" + wrap(blind[0], 140, 2),
                     fontsize=9, color="tab:red")
    return fig


def spectrogram(samples: np.ndarray, sampling_rate: int, height: int = 96) -> np.ndarray:
    """A clip's log-magnitude spectrogram (25 ms windows, 10 ms hop, 0 Hz at the bottom) as an RGB image
    (height, frames, 3) uint8, 60 dB of range: the picture an audio caption table shows for a clip."""
    win, hop = int(0.025 * sampling_rate), int(0.010 * sampling_rate)
    x = np.asarray(samples, dtype=np.float32)
    x = np.pad(x, (0, max(0, win - len(x))))
    frames = np.lib.stride_tricks.sliding_window_view(x, win)[::hop] * np.hanning(win)  # (T, win)
    db = 20 * np.log10(np.abs(np.fft.rfft(frames, axis=1)).T + 1e-6)  # (F, T)
    db = np.clip((db - db.max() + 60) / 60, 0, 1)[::-1]  # top = high frequencies
    rows = np.linspace(0, db.shape[0] - 1, height).astype(int)
    return (plt.get_cmap("magma")(db[rows])[..., :3] * 255).astype(np.uint8)


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
