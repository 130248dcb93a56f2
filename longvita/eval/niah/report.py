"""NIAH results: the table (``results.jsonl``, rewritten whole and atomically after every
cell), the record of what produced it (``run.json``), ``results.csv``, the heatmap and the
summary.

``run.json`` holds everything a cell's result depends on besides the cell's own key
(length, depth, needle): the model (a fingerprint of its weights and its config), the
mode, the distractors and the seed, each needle's content, the haystack's identity and
the preprocessing. ``--resume`` continues a table only when those match (a grid may grow:
new lengths, depths or needles add cells); otherwise it refuses with one line naming what
differs, so cells of two runs are never mixed in one table.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

from longvita.common import LongVITAError
from longvita.files import write_atomic

__all__ = ["ResumeMismatch", "check_resume", "draw_heatmap", "read_results", "run_record", "summary", "write_atomic",
           "write_csv", "write_results"]

RESULTS = "results.jsonl"
RUN = "run.json"


class ResumeMismatch(LongVITAError, ValueError):
    """``--resume`` into a results folder written by another run."""


def read_results(out_dir: str | os.PathLike) -> list[dict]:
    path = Path(out_dir) / RESULTS
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError) as exc:
        raise ResumeMismatch(f"--out {out_dir}: {RESULTS} is not a results table ({exc})") from None


def write_results(out_dir: Path, rows: list[dict]) -> None:
    write_atomic(out_dir / RESULTS, "".join(json.dumps(r) + "\n" for r in rows), what=f"--out {out_dir}")


def _needle_digest(nd) -> str:
    h = hashlib.sha256()
    if hasattr(nd, "sentence"):
        h.update(f"{nd.sentence}|{nd.question}|{nd.answer}".encode())
    else:
        h.update(f"{nd.question}|{nd.answer}|{nd.image.size}".encode())
        h.update(nd.image.tobytes())
    return h.hexdigest()[:16]


def run_record(model_fingerprint: str, grid, needles, haystack_identity: str, preprocess: str) -> dict:
    """What a table's cells depend on besides their keys (see the module docstring)."""
    return {"model": model_fingerprint, "mode": grid.mode, "distractors": int(grid.distractors), "seed": int(grid.seed),
            "needles": {nd.id: _needle_digest(nd) for nd in needles}, "haystack": haystack_identity,
            "preprocess": preprocess}


def check_resume(out_dir: Path, record: dict) -> None:
    """Raise ResumeMismatch unless ``out_dir`` holds no table or a table of this run."""
    path = out_dir / RUN
    if not path.exists():
        if (out_dir / RESULTS).exists():
            raise ResumeMismatch(f"--out {out_dir}: its {RESULTS} has no {RUN} saying what produced it "
                                 "(written by an older longvita); use another --out")
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ResumeMismatch(f"--out {out_dir}: {RUN} is unreadable ({exc})") from None
    differs = [k for k in record if k != "needles" and old.get(k) != record[k]]
    old_needles = old.get("needles") if isinstance(old.get("needles"), dict) else {}
    changed = sorted(i for i, d in record["needles"].items() if i in old_needles and old_needles[i] != d)
    if changed:
        differs.append(f"the content of needle(s) {', '.join(changed)}")
    if differs:
        names = {"model": "the model's weights or config", "haystack": "the haystack"}
        what = ", ".join(names.get(k, k) for k in differs)
        raise ResumeMismatch(f"--resume: --out {out_dir} holds cells of another run (it differs in {what}); "
                             "use another --out or drop --resume")


def write_run(out_dir: Path, record: dict) -> None:
    """Record this run; needles of an earlier run of the same table stay recorded."""
    path = out_dir / RUN
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8")).get("needles", {})
            record = dict(record, needles={**old, **record["needles"]})
        except (OSError, ValueError, AttributeError, TypeError):
            pass
    write_atomic(path, json.dumps(record, indent=1) + "\n", what=f"--out {out_dir}")


def write_csv(out_dir: Path, rows: list[dict]) -> None:
    cols = ["mode", "context_tokens", "frames", "depth", "needle", "answer", "correct", "logprob",
            "needle_start", "needle_end", "answer_start"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_atomic(out_dir / "results.csv", buf.getvalue(), what=f"--out {out_dir}")


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
    write_atomic(Path(path), buf.getvalue())
    return acc.shape


def summary(rows: list[dict]) -> dict:
    """Accuracy overall and per length."""
    if not rows:
        return {"cells": 0}
    per_len = {}
    for r in rows:
        per_len.setdefault(int(r["length"]), []).append(r["correct"])
    return {"cells": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "by_length": {str(k): sum(v) / len(v) for k, v in sorted(per_len.items())}}
