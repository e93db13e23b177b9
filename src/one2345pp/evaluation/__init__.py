"""Evaluation: geometry metrics (F-Score, Chamfer, alignment)."""
