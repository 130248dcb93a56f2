"""Needle-in-a-haystack evaluation, visual (V-NIAH) and text, scored by teacher forcing.

LongVA's protocol: one forward pass over haystack + question + answer, correct when the
argmax at every answer position is the answer token (no sampling, no KV cache). Here that
pass is context-parallel when run under torchrun: every rank embeds only its zigzag shard
(text embeddings, cached frame features placed into the media slots), ring attention joins
the shards, and ``gather_logits`` projects only the rows that predict answer tokens. The
answer's mean log-likelihood is reported beside the 0/1 score.

Visual: the haystack is frames at 1 fps from a folder of videos (or generated frames);
the needle image replaces the frame at the depth. The haystack's frame features are
computed once, in bounded chunks, cached on disk under ``out/cache`` keyed by the frames'
source, indices, preprocessing and the vision weights, and reused by every cell.
Text: the haystack is token ids of the given text files (or generated filler); the
needle sentence goes in at a token depth, optional distractor sentences elsewhere.

Every cell's token layout (needle span, answer start) is recorded with its result, so a
cell can be checked by hand. The table is rewritten whole and atomically after every
cell (``results.jsonl``; ``results.csv`` and ``heatmap.png`` at the end); ``resume=True``
skips the cells already in it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longvita.data.errors import InputError
from longvita.data.template import build_conversation
from longvita.data.video import frame_tile
from longvita.dist.train import RingAttention
from longvita.dist.zigzag import zigzag_layout
from longvita.eval.needles import (
    TextNeedle, VisualNeedle, distractors, filler_text, make_text_needles, make_visual_needles,
    synthetic_haystack_frames,
)

__all__ = ["NiahGrid", "CellInputs", "run_niah", "score_cell", "text_cell", "visual_cell", "draw_heatmap",
           "VideoHaystack", "TextHaystack", "load_needles", "default_needles", "summary", "read_results"]

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm")
RESULTS = "results.jsonl"


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


@dataclass
class CellInputs:
    """One cell's whole sequence. answer_positions: where the answer tokens sit (each is
    predicted by the row before it). frame_sources: per media frame, the haystack frame it
    shows, or -1 for the needle (visual only)."""

    input_ids: torch.Tensor
    answer_positions: torch.Tensor
    needle_span: tuple[int, int]
    frame_sources: list[int] = field(default_factory=list)


# ----------------------------------------------------------------------------------
# Haystacks
# ----------------------------------------------------------------------------------


def _haystack_files(path, suffixes: tuple[str, ...]) -> list[Path]:
    """One file, or a folder's files with these suffixes in name order."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise InputError(f"--haystack {str(p)!r} does not exist")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in suffixes)
    if not files:
        raise InputError(f"--haystack folder {str(p)!r} holds no {' or '.join(suffixes)} files")
    return files


class TextHaystack:
    """Token ids of a text haystack: the files of a folder (sorted, ``.txt``/``.md``), one
    file, or generated filler (``path=None``)."""

    def __init__(self, tokenizer, path: str | os.PathLike | None, seed: int = 0, min_tokens: int = 0):
        if path is None:
            text, self.source = filler_text(max(1000, min_tokens), seed), f"filler(seed={seed})"
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            while len(ids) < min_tokens:  # filler runs ~1.3 tokens a word: top up if short
                text += " " + filler_text(min_tokens - len(ids) + 100, seed + len(ids))
                ids = tokenizer.encode(text, add_special_tokens=False).ids
        else:
            files = _haystack_files(path, (".txt", ".md"))
            text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            self.source = ",".join(str(f) for f in files)
        self.ids = torch.tensor(ids, dtype=torch.long)


class VideoHaystack:
    """Frames at 1 fps from the videos of a folder (sorted, read in turn until enough
    frames), one video file, or generated frames (``path=None``). Frames are uint8 tiles."""

    def __init__(self, path: str | os.PathLike | None, n_frames: int, image_size: int, preprocess: str, seed: int = 0):
        self.image_size, self.preprocess = image_size, preprocess
        if path is None:
            frames = synthetic_haystack_frames(n_frames, image_size, seed)
            self.tiles = torch.stack([frame_tile(f, image_size, preprocess, raw=True) for f in frames])
            self.key_parts = [f"synthetic:{seed}:{n_frames}"]
            return
        from longvita.data.video import read_video

        p = Path(path)
        files = _haystack_files(p, VIDEO_SUFFIXES)
        chunks, parts, have = [], [], 0
        for f in files:
            if have >= n_frames:
                break
            video = read_video(f, max_frames=n_frames - have, max_fps=1.0, image_size=image_size,
                               preprocess=preprocess, raw=True)
            chunks.append(video.pixel_values)
            have += video.pixel_values.shape[0]
            st = f.stat()
            parts.append(f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}:{video.indices[0]}-{video.indices[-1]}")
        self.tiles = torch.cat(chunks)
        if self.tiles.shape[0] < n_frames:
            raise InputError(f"--haystack {str(p)!r} gives {self.tiles.shape[0]} frames at 1 fps; the grid needs {n_frames}")
        self.key_parts = parts

    def cache_key(self, model) -> str:
        """Source, frames, preprocessing and a fingerprint of the vision weights."""
        h = hashlib.sha256()
        for part in self.key_parts + [self.preprocess, str(self.image_size), str(self.tiles.shape[0])]:
            h.update(part.encode())
        with torch.no_grad():
            for name, p in list(model.vision.named_parameters()) + list(model.projector.named_parameters()):
                h.update(name.encode())
                h.update(f"{p.double().sum().item():.10e}:{p.double().abs().sum().item():.10e}".encode())
        return h.hexdigest()[:16]


def frame_features(model, tiles: torch.Tensor, chunk: int = 16, progress: Callable | None = None) -> torch.Tensor:
    """(F, tokens_per_tile, hidden) projected features of uint8 tiles, ``chunk`` tiles at
    a time (a 4,096-frame haystack is never encoded at once). On the model's device and
    dtype, returned on the CPU."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, tiles.shape[0], chunk):
            emb = model.image_embeddings(tiles[s:s + chunk].to(device))
            out.append(emb.view(min(chunk, tiles.shape[0] - s), -1, emb.shape[-1]).cpu())
            if progress is not None:
                progress(min(chunk, tiles.shape[0] - s))
    return torch.cat(out)


def cached_frame_features(model, haystack: VideoHaystack, cache_dir: Path, group=None,
                          chunk: int = 16, progress: Callable | None = None) -> tuple[torch.Tensor, bool]:
    """The haystack's frame features from ``cache_dir`` (computed and saved by rank 0 if
    missing; the other ranks wait and read). Returns (features, was_cached)."""
    from safetensors.torch import load_file, save_file

    rank, world = _rank_world(group)
    path = cache_dir / f"frames-{haystack.cache_key(model)}.safetensors"
    was_cached = path.exists()
    if not was_cached and rank == 0:
        feats = frame_features(model, haystack.tiles, chunk, progress)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"features": feats.contiguous()}, str(tmp))
        os.replace(tmp, path)  # whole or absent, never half-written
    if world > 1:
        dist.barrier(group=group)
    return load_file(str(path))["features"], was_cached


# ----------------------------------------------------------------------------------
# Cells
# ----------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def text_cell(tokenizer, special, haystack: TextHaystack, needle: TextNeedle, depth: float, context_tokens: int,
              n_distractors: int = 0, seed: int = 0) -> CellInputs:
    """ChatML user turn: haystack with the needle at ``depth`` % of the haystack tokens,
    then the question; assistant turn: the answer. ``context_tokens`` is the whole cell."""
    prefix = _encode(tokenizer, "<|im_start|>user\n")
    needle_ids = _encode(tokenizer, " " + needle.sentence + " ")
    suffix = _encode(tokenizer, "\n" + needle.question + " Answer with the number only.<|im_end|>\n<|im_start|>assistant\n")
    answer = _encode(tokenizer, needle.answer)
    extra = [_encode(tokenizer, " " + s + " ") for s in distractors(needle, n_distractors, seed)]
    fixed = len(prefix) + len(needle_ids) + len(suffix) + len(answer) + 1 + sum(map(len, extra))
    n_hay = context_tokens - fixed
    if n_hay < 1:
        raise ValueError(f"context length {context_tokens} is too short: the needle, question and answer take {fixed} tokens")
    if n_hay > haystack.ids.numel():
        raise InputError(f"the haystack has {haystack.ids.numel()} tokens; a {context_tokens}-token cell needs {n_hay}")
    hay = haystack.ids[:n_hay].tolist()
    at = round(depth / 100 * n_hay)
    # distractors at seeded depths away from the needle (inserted from the back, so the
    # needle's offset only moves by those placed before it)
    rng = random.Random(f"{seed}-{needle.id}-{context_tokens}-{depth}")
    spots = sorted(((rng.randrange(0, n_hay + 1), d) for d in extra), key=lambda t: -t[0])
    shift = 0
    for spot, d in spots:
        hay[spot:spot] = d
        if spot <= at:
            shift += len(d)
    at += shift
    hay[at:at] = needle_ids
    ids = prefix + hay + suffix + answer + [special.im_end]
    start = len(prefix) + at
    answer_start = len(prefix) + len(hay) + len(suffix)
    return CellInputs(torch.tensor(ids, dtype=torch.long), torch.arange(answer_start, answer_start + len(answer)),
                      (start, start + len(needle_ids)))


def visual_cell(tokenizer, special, config, needle: VisualNeedle, depth: float, n_frames: int,
                preprocess: str) -> CellInputs:
    """ChatML user turn: ``n_frames`` video frames (haystack frames 0..n-1, the one at
    ``depth`` replaced by the needle), then the question; assistant turn: the answer."""
    size = config.vision.image_size
    stand_in = torch.zeros(1, 3, size, size, dtype=torch.uint8).expand(n_frames, -1, -1, -1)
    conv = build_conversation(
        tokenizer, special,
        [("user", [stand_in, "\n" + needle.question + " Answer with one word or number."]), ("assistant", [needle.answer])],
        tokens_per_tile=config.tokens_per_tile, preprocess=preprocess, pixels=False,
    )
    targets = conv.target_mask.nonzero().squeeze(1)[:-1]  # the answer, not its <|im_end|>
    needle_frame = round(depth / 100 * (n_frames - 1))
    slots = torch.isin(conv.input_ids, torch.tensor(special.context_token_ids)).nonzero().squeeze(1)
    n = config.tokens_per_tile
    span = (int(slots[needle_frame * n]), int(slots[needle_frame * n + n - 1]) + 1)
    sources = [-1 if f == needle_frame else f for f in range(n_frames)]
    return CellInputs(conv.input_ids, targets, span, sources)


# ----------------------------------------------------------------------------------
# Scoring: one teacher-forced forward, context-parallel when a group has > 1 rank
# ----------------------------------------------------------------------------------


def _rank_world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@torch.no_grad()
def score_cell(model, cell: CellInputs, media_features: Callable[[torch.Tensor], torch.Tensor] | None = None,
               group=None) -> dict:
    """Teacher-forced score of one cell.

    media_features(ordinals) -> (n, hidden): the embeddings of the given media tokens
    (ordinal k = the k-th media token of the sequence). Every rank embeds only its zigzag
    shard; the rows that predict answer tokens are projected with ``gather_logits`` on the
    rank that holds them, and the per-answer-token results are summed over the group.
    Returns correct (every answer token is the argmax), logprob (mean log-likelihood of
    the answer tokens) and predicted (the argmax ids)."""
    device = next(model.parameters()).device
    ids = cell.input_ids
    total, n_ans = ids.numel(), cell.answer_positions.numel()
    rank, world = _rank_world(group)
    layout = None
    if world > 1:
        layout = zigzag_layout(torch.tensor([0, total], dtype=torch.int32), world, device)
        index, valid = layout.local_to_global(rank)
    else:
        index, valid = torch.arange(total), torch.ones(total, dtype=torch.bool)
    local_ids = ids.index_select(0, index)
    embeds = model.text.embed_tokens(local_ids.to(device))
    media = torch.isin(ids, torch.tensor(model.config.image_token_ids or [-1]))
    if bool(media.any()):
        if media_features is None:
            raise ValueError("the cell has media tokens but no media_features was given")
        ordinal = media.long().cumsum(0) - 1
        slots = (media.index_select(0, index) & valid).nonzero().squeeze(1)
        if slots.numel():
            feats = media_features(ordinal.index_select(0, index.index_select(0, slots)))
            embeds = model.place_media(embeds, slots.to(device), feats.to(device))
    # row answer_positions[k] - 1 predicts answer token k
    which = torch.full((total,), -1, dtype=torch.long)
    which[cell.answer_positions - 1] = torch.arange(n_ans)
    local_k = torch.where(valid, which.index_select(0, index), torch.full_like(index, -1))
    rows = (local_k >= 0).nonzero().squeeze(1)
    kwargs = dict(inputs_embeds=embeds, position_ids=index.to(device), logits_index=rows.to(device))
    if layout is not None:
        kwargs["attention"] = RingAttention(layout, group)
    logits = model(**kwargs).float()  # (rows, vocab): answer rows only
    k = local_k.index_select(0, rows).to(device)
    targets = ids.index_select(0, cell.answer_positions).to(device).index_select(0, k)
    hits = torch.zeros(n_ans, device=device)
    logp = torch.zeros(n_ans, device=device)
    pred = torch.zeros(n_ans, dtype=torch.long, device=device)
    if rows.numel():
        hits[k] = (logits.argmax(-1) == targets).float()
        logp[k] = F.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
        pred[k] = logits.argmax(-1)
    if world > 1:
        for t in (hits, logp, pred):
            dist.all_reduce(t, group=group)  # each answer token is held by exactly one rank
    return {"correct": bool(hits.sum().item() == n_ans), "logprob": logp.mean().item(),
            "predicted": pred.cpu().tolist()}


# ----------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------


def load_needles(path: str | os.PathLike, mode: str, image_size: int) -> list:
    """Needles from a JSON-lines file: text ``{"id", "sentence", "question", "answer"}``;
    visual ``{"id", "image" (a path, relative to the file), "question", "answer"}``."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise InputError(f"--needles {str(p)!r} does not exist")
    needles = []
    need = ("id", "sentence", "question", "answer") if mode == "text" else ("id", "image", "question", "answer")
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"--needles {str(p)}:{n}: not JSON ({e.msg})") from None
        missing = [k for k in need if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise InputError(f"--needles {str(p)}:{n}: missing {', '.join(missing)} (a {mode} needle needs {', '.join(need)})")
        if mode == "text":
            needles.append(TextNeedle(str(rec["id"]), rec["sentence"], rec["question"], str(rec["answer"])))
        else:
            img_path = (p.parent / rec["image"]).resolve()
            if not img_path.is_file():
                raise InputError(f"--needles {str(p)}:{n}: image {str(img_path)!r} does not exist")
            image = Image.open(img_path).convert("RGB")
            needles.append(VisualNeedle(str(rec["id"]), "file", image, rec["question"], str(rec["answer"])))
    if not needles:
        raise InputError(f"--needles {str(p)!r} holds no needles")
    return needles


def _cell_key(row: dict) -> tuple:
    return (row["mode"], int(row["length"]), float(row["depth"]), row["needle"])


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_results(out_dir: str | os.PathLike) -> list[dict]:
    path = Path(out_dir) / RESULTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_results(out_dir: Path, rows: list[dict]) -> None:
    _write_atomic(out_dir / RESULTS, "".join(json.dumps(r) + "\n" for r in rows).encode())


def write_csv(out_dir: Path, rows: list[dict]) -> None:
    cols = ["mode", "context_tokens", "frames", "depth", "needle", "answer", "correct", "logprob",
            "needle_start", "needle_end", "answer_start"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    _write_atomic(out_dir / "results.csv", buf.getvalue().encode())


def draw_heatmap(rows: list[dict], path: str | os.PathLike, title: str = "") -> tuple[int, int]:
    """Accuracy per (depth, length) cell averaged over needles, LongVA's Figure 4 layout:
    x = context length, y = depth, colour = accuracy. Returns the grid's (depths, lengths)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = sorted({int(r["length"]) for r in rows})
    depths = sorted({float(r["depth"]) for r in rows})
    acc = np.full((len(depths), len(lengths)), np.nan)
    for i, d in enumerate(depths):
        for j, n in enumerate(lengths):
            cell = [r["correct"] for r in rows if float(r["depth"]) == d and int(r["length"]) == n]
            if cell:
                acc[i, j] = sum(cell) / len(cell)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(lengths) + 2), max(3, 0.35 * len(depths) + 1.5)), dpi=100)
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    mode = rows[0]["mode"] if rows else ""
    ax.set_xlabel("frames" if mode == "visual" else "context tokens")
    ax.set_ylabel("depth (%)")
    ax.set_title(title or f"{mode} needle in a haystack: accuracy")
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _write_atomic(Path(path), buf.getvalue())
    return acc.shape


def run_niah(pipe, grid: NiahGrid, needles: Sequence, out_dir: str | os.PathLike, *, haystack: str | None = None,
             preprocess: str = "long-vita", resume: bool = False, group=None, feature_chunk: int = 16,
             show_progress: bool = True) -> list[dict]:
    """Evaluate every (length, depth, needle) cell of ``grid``; returns the table's rows.
    Rank 0 writes ``results.jsonl`` after every cell (whole, atomically), then
    ``results.csv`` and ``heatmap.png`` (when matplotlib is installed)."""
    from tqdm import tqdm

    out = Path(out_dir)
    rank, world = _rank_world(group)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    model, tok, special = pipe.model, pipe.tokenizer, pipe.special
    rows = read_results(out) if resume else []
    done = {_cell_key(r) for r in rows}
    cells = [(n, d, nd) for n in grid.lengths for d in grid.depths for nd in needles
             if (grid.mode, int(n), float(d), nd.id) not in done]
    bar = tqdm(total=len(cells), desc=f"niah {grid.mode}", disable=not show_progress or rank != 0, unit="cell")
    if grid.mode == "visual":
        size = model.config.vision.image_size
        hay = VideoHaystack(haystack, max(grid.lengths), size, preprocess, seed=grid.seed)
        enc = tqdm(total=hay.tiles.shape[0], desc="haystack features", unit="frame",
                   disable=not show_progress or rank != 0)
        feats, _ = cached_frame_features(model, hay, out / "cache", group, feature_chunk, enc.update)
        enc.close()
        n_tok = model.config.tokens_per_tile
        needle_feats = {nd.id: frame_features(model, frame_tile(nd.image, size, preprocess, raw=True)[None])[0]
                        for nd in needles}
    else:
        hay = TextHaystack(tok, haystack, seed=grid.seed, min_tokens=max(grid.lengths))
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
        row = {
            "mode": grid.mode, "length": int(n), "depth": float(d), "needle": nd.id, "answer": nd.answer,
            "context_tokens": cell.input_ids.numel(), "frames": int(n) if grid.mode == "visual" else None,
            "correct": result["correct"], "logprob": result["logprob"],
            "predicted": tok.decode(result["predicted"]),
            "needle_start": cell.needle_span[0], "needle_end": cell.needle_span[1],
            "answer_start": int(cell.answer_positions[0]), "answer_tokens": cell.answer_positions.numel(),
            "world_size": world,
        }
        rows.append(row)
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


def default_needles(mode: str, n: int, seed: int, image_size: int) -> list:
    """The generated needle set (LongVA's were never released)."""
    return make_text_needles(n, seed) if mode == "text" else make_visual_needles(n, seed, image_size)


def summary(rows: list[dict]) -> dict:
    """Accuracy overall and per length."""
    if not rows:
        return {"cells": 0}
    per_len = {}
    for r in rows:
        per_len.setdefault(int(r["length"]), []).append(r["correct"])
    return {"cells": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "by_length": {str(k): sum(v) / len(v) for k, v in sorted(per_len.items())}}

