"""The NIAH grid: which cells to evaluate, the needles, and the run over every
(length, depth, needle) cell with a resumable table (``report``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from longvita.data.errors import InputError
from longvita.data.video import frame_tile
from longvita.eval.niah.cells import text_cell, visual_cell
from longvita.eval.niah.haystack import TextHaystack, VideoHaystack, cached_frame_features, frame_features, weights_fingerprint
from longvita.eval.niah.needles import TextNeedle, VisualNeedle, make_text_needles, make_visual_needles
from longvita.eval.niah.report import check_resume, draw_heatmap, read_results, run_record, write_csv, write_results, write_run
from longvita.eval.niah.score import score_cell
from longvita.files import OutputError
from longvita.parallel import CPGroups, rank_world

__all__ = ["NiahGrid", "default_needles", "load_needles", "run_niah"]


@dataclass
class NiahGrid:
    """What to evaluate. ``lengths``: frames per haystack (visual) or context tokens (text)."""

    mode: str  # 'visual' or 'text'
    lengths: list[int]
    depths: list[float]
    distractors: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("visual", "text"):
            raise ValueError(f"mode must be 'visual' or 'text', got {self.mode!r}")
        if not self.lengths or any(int(n) < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive integers, got {self.lengths}")
        if not self.depths or any(not 0 <= d <= 100 for d in self.depths):
            raise ValueError(f"depths must lie in [0, 100], got {self.depths}")
        if self.distractors < 0:
            raise ValueError(f"distractors must be >= 0, got {self.distractors}")


def _field(rec: dict, key: str, where: str, *, nonempty: bool = True) -> str:
    value = rec[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key in ("id", "answer"):
        value = str(value)  # ids and answers may be written as numbers
    if not isinstance(value, str):
        raise InputError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise InputError(f"{where}: '{key}' is empty")
    return value


def load_needles(path: str | os.PathLike, mode: str, image_size: int) -> list:
    """Needles from a JSON-lines file: text ``{"id", "sentence", "question", "answer"}``;
    visual ``{"id", "image" (a path, relative to the file), "question", "answer"}``. Every
    field a non-empty string, ids distinct; images are opened through ``load_image`` (so a
    corrupt file, a decompression bomb or a folder is one clear error)."""
    from longvita.data.image import load_image

    p = Path(path)
    if not p.is_file():
        raise InputError(f"--needles {str(p)!r} does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"--needles {str(p)!r} is not UTF-8 (byte {exc.start}: {exc.reason})") from None
    needles, seen = [], {}
    need = ("id", "sentence", "question", "answer") if mode == "text" else ("id", "image", "question", "answer")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--needles {p}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not JSON ({e.msg})") from None
        missing = [k for k in need if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)} (a {mode} needle needs {', '.join(need)})")
        nid = _field(rec, "id", where)
        if nid in seen:
            raise InputError(f"{where}: id {nid!r} repeats line {seen[nid]} (ids key the results table)")
        seen[nid] = n
        question, answer = _field(rec, "question", where), _field(rec, "answer", where)
        if mode == "text":
            needles.append(TextNeedle(nid, _field(rec, "sentence", where), question, answer))
        else:
            image = load_image(p.parent / _field(rec, "image", where), image_size=image_size, max_num=1)
            needles.append(VisualNeedle(nid, "file", image, question, answer))
    if not needles:
        raise InputError(f"--needles {str(p)!r} holds no needles")
    return needles


def default_needles(mode: str, n: int, seed: int, image_size: int) -> list:
    """The generated needle set (LongVA's were never released)."""
    return make_text_needles(n, seed) if mode == "text" else make_visual_needles(n, seed, image_size)


def run_niah(pipe, grid: NiahGrid, needles: Sequence, out_dir: str | os.PathLike, *, haystack: str | None = None,
             preprocess: str = "long-vita", resume: bool = False, group=None, feature_chunk: int = 16,
             show_progress: bool = True) -> list[dict]:
    """Evaluate every (length, depth, needle) cell of ``grid``; returns the table's rows.
    Rank 0 writes ``results.jsonl`` after every cell (whole, atomically), then
    ``results.csv`` and ``heatmap.png`` (when matplotlib is installed). ``resume=True``
    skips the cells already in the table, after checking it was written by this same run
    (``report.check_resume``)."""
    from tqdm import tqdm

    out = Path(out_dir)
    # group: a process group, a parallel.CPGroups (a ring of Ulysses groups), or None
    rank, world = rank_world(CPGroups.of(group).group)
    ids = [nd.id for nd in needles]
    if len(set(ids)) != len(ids):
        raise InputError(f"needle ids must be distinct (they key the results table), got {ids}")
    model, tok, special = pipe.model, pipe.tokenizer, pipe.special
    if grid.mode == "visual":
        size = model.config.vision.image_size
        hay = VideoHaystack(haystack, max(grid.lengths), size, preprocess, seed=grid.seed)
    else:
        hay = TextHaystack(tok, haystack, seed=grid.seed, min_tokens=max(grid.lengths))
    record = run_record(weights_fingerprint([model]) + ":" + json.dumps(model.config.to_dict(), sort_keys=True),
                        grid, needles, hay.identity, preprocess)
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"--out {out}: cannot create the results folder ({exc.strerror or exc})") from None
        if resume:
            check_resume(out, record)
        write_run(out, record)
    rows = read_results(out) if resume else []
    done = {(r["mode"], int(r["length"]), float(r["depth"]), r["needle"]) for r in rows}
    cells = [(n, d, nd) for n in grid.lengths for d in grid.depths for nd in needles
             if (grid.mode, int(n), float(d), nd.id) not in done]
    bar = tqdm(total=len(cells), desc=f"niah {grid.mode}", disable=not show_progress or rank != 0, unit="cell")
    if grid.mode == "visual":
        enc = tqdm(total=hay.tiles.shape[0], desc="haystack features", unit="frame",
                   disable=not show_progress or rank != 0)
        feats, _ = cached_frame_features(model, hay, out / "cache", CPGroups.of(group).group, feature_chunk,
                                         enc.update)
        enc.close()
        n_tok = model.config.tokens_per_tile
        needle_feats = {nd.id: frame_features(model, frame_tile(nd.image, size, preprocess, raw=True)[None])[0]
                        for nd in needles}
    for n, d, nd in cells:
        if grid.mode == "visual":
            cell = visual_cell(tok, special, model.config, nd, d, int(n), preprocess)
            sources = torch.tensor(cell.frame_sources)
            nf = needle_feats[nd.id]

            def media(ordinals, sources=sources, nf=nf):
                frame, within = ordinals // n_tok, ordinals % n_tok
                src = sources.index_select(0, frame)
                hay_rows = feats[src.clamp(min=0), within]
                return torch.where((src < 0)[:, None], nf[within], hay_rows)

            result = score_cell(model, cell, media, group)
        else:
            cell = text_cell(tok, special, hay, nd, d, int(n), grid.distractors, grid.seed)
            result = score_cell(model, cell, None, group)
        rows.append({
            "mode": grid.mode, "length": int(n), "depth": float(d), "needle": nd.id, "answer": nd.answer,
            "context_tokens": cell.input_ids.numel(), "frames": int(n) if grid.mode == "visual" else None,
            "correct": result["correct"], "logprob": result["logprob"],
            "predicted": tok.decode(result["predicted"]),
            "needle_start": cell.needle_span[0], "needle_end": cell.needle_span[1],
            "answer_start": int(cell.answer_positions[0]), "answer_tokens": cell.answer_positions.numel(),
            "world_size": world,
        })
        if rank == 0:
            write_results(out, rows)
        bar.update(1)
    bar.close()
    if rank == 0 and rows:
        write_csv(out, rows)
        try:
            draw_heatmap(rows, out / "heatmap.png")
        except ImportError:
            import warnings

            warnings.warn("matplotlib is not installed: no heatmap.png (pip install 'longvita[eval]')", stacklevel=2)
    return rows
