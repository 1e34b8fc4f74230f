"""The engine: sources -> models -> (explainers) -> matching and metrics, plus training, evaluation and the CLI.

`flows` orchestrates it; `pipeline` never imports `flows`, `storage` or `reports`.
"""
