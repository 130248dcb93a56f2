"""Needle-in-a-haystack evaluation, visual (V-NIAH) and text, scored by teacher forcing
(LongVA's protocol): ``needles`` (generated needle sets), ``haystack`` (text and video
haystacks, the frame-feature cache), ``cells`` (one cell's sequence, through the chat
template builder), ``score`` (one context-parallel teacher-forced pass), ``report`` (the
resumable table, the run record, CSV, heatmap) and ``run`` (the grid)."""

from longvita.eval.niah.cells import CellInputs, text_cell, visual_cell
from longvita.eval.niah.haystack import TextHaystack, VideoHaystack, cached_frame_features, frame_features
from longvita.eval.niah.report import ResumeMismatch, draw_heatmap, read_results, summary
from longvita.eval.niah.run import NiahGrid, default_needles, load_needles, run_niah
from longvita.eval.niah.score import score_cell

__all__ = ["CellInputs", "NiahGrid", "ResumeMismatch", "TextHaystack", "VideoHaystack", "cached_frame_features",
           "default_needles", "draw_heatmap", "frame_features", "load_needles", "read_results", "run_niah", "score_cell",
           "summary", "text_cell", "visual_cell"]
