"""The offline default's stand-ins: a tiny CLIP vision tower and a tiny Qwen2, built locally with the real classes."""
