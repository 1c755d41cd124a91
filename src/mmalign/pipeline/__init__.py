"""One module per DVC stage: `run(...)` does the work; `stages/*.py` only parse args and call it."""
