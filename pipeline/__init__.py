"""The engine: sources -> models -> (explainers) -> matching and metrics, a shard's work (`shard`), plus
training and evaluation.

`flows` orchestrates it; `pipeline` never imports `flows`, `storage` or `reports`.
"""
