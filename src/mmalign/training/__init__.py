"""Training infrastructure: the loop (fit), resumable state, the losses, and multi-process helpers."""
