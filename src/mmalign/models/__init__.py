"""Phase 1 and Phase 2 models: the frozen encoders, the adapters and aligner (Phase 1), the projector, prompt layout and MultimodalLLM (Phase 2)."""
