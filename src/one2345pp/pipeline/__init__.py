"""Inference: the pipeline that chains the exported stages, and its input preprocessing."""
