"""Evaluation: needle-in-a-haystack (``eval.niah``: visual and text, teacher-forced,
context-parallel) and the demo model's held-out tasks (``eval.demo``).

Layer: above ``longvita.runtime`` and ``longvita.parallel``, below the CLI."""

from longvita.eval.niah import NiahGrid, run_niah, score_cell, text_cell, visual_cell

__all__ = ["NiahGrid", "run_niah", "score_cell", "text_cell", "visual_cell"]
