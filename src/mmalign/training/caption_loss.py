"""Next-token loss from hidden states at the labelled positions only, through the LM head in chunks.

With a 151,936-token vocabulary the `(B, T, V)` logits of a whole batch (and their float32 copy and
gradient) cost more memory than the model's activations, though only caption positions carry a label.
`linear_cross_entropy` computes the head's logits a chunk of rows at a time and, in the same pass,
the loss's gradient w.r.t. the hidden states, so no full-vocabulary tensor outlives its chunk (as
Liger Kernel's fused linear cross-entropy does, Hsu et al. 2024).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MB in float32 (about 110 rows at Qwen's vocabulary)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `t` runs in here: autocast's when it is on (as the plain LM head would), else t's."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        dtype = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # cast once, not once per chunk
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # (N, H)
            for s in range(0, hidden.shape[0], chunk):
                h, t = hidden[s:s + chunk].to(dtype), targets[s:s + chunk]
                logits = (h @ w.T).float()  # (n, V); the loss in float32, as HF's loss function does
                lse = logits.logsumexp(-1)  # (n,)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if grad is not None:  # d(sum of losses)/d logits = softmax - one_hot
                    g = logits.sub_(lse[:, None]).exp_()
                    g[torch.arange(len(t), device=g.device), t] -= 1.0
                    grad[s:s + chunk] = (g.to(dtype) @ w).to(hidden.dtype)  # (n, H)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of head(hidden) against targets, hidden (N, H), targets (N,) -> scalar float32.

    Equals `F.cross_entropy(head(hidden).float(), targets)`. Fused and chunked when `head` is a frozen,
    bias-free `nn.Linear` (an LM head); otherwise (LoRA on the head, a bias) it applies the head to the
    N rows directly, which is still logits on labelled rows only.
    """
    if hidden.shape[0] == 0:
        raise ValueError("no labelled positions in the batch: every caption is empty")
    w = getattr(head, "weight", None)
    if type(head) is not nn.Linear or head.bias is not None or w is None or w.requires_grad:
        return F.cross_entropy(head(hidden).float(), targets)
    rows = chunk or max(1, CHUNK_ELEMENTS // w.shape[0])
    return _LinearCrossEntropy.apply(hidden, w, targets, rows) / hidden.shape[0]
