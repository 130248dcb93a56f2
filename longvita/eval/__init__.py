"""Evaluation: needle-in-a-haystack (visual and text), scored by teacher forcing.

Layer: above ``longvita.dist`` (it runs context-parallel), beside the CLI."""

from longvita.eval.niah import NiahGrid, run_niah, score_cell, text_cell, visual_cell

__all__ = ["NiahGrid", "run_niah", "score_cell", "text_cell", "visual_cell"]
