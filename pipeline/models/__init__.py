"""Detector adapters: load a DETR-family checkpoint, preprocess a batch, forward with attention capture,
postprocess to detections that keep their query index. `default/` holds the shipped small model and its card.

Explainers may import this package (the model interface); it imports nothing else of the project.
"""
