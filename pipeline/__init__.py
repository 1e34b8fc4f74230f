"""The engine: sources -> models -> (explainers) -> matching and metrics, a shard's work (`shard`), plus
training and evaluation.

`flows` orchestrates it; `pipeline` never imports `flows` or `reports`, and `storage` only where the config
reads the schema version for the run hash (tests/test_imports.py checks the layer rules).
"""
