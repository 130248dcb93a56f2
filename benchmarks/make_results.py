"""Turn benchmark JSON files into Markdown tables for benchmarks/RESULTS.md.

    python benchmarks/make_results.py benchmarks/results/*.json >> benchmarks/RESULTS.md
"""

from __future__ import annotations

import json
import sys


def fmt_number(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def columns(payload: dict) -> list[str]:
    """The declared metrics that some row has, then any other metric the rows carry
    (a script may declare more columns than one run fills, or fill one it did not declare)."""
    present = [m for r in payload["rows"] for m in r["metrics"]]
    cols = [m for m in payload.get("metrics", []) if m in present]
    for m in present:
        if m not in cols:
            cols.append(m)
    return cols


def to_markdown(payload: dict) -> str:
    env = payload.get("environment", {})
    metrics = columns(payload)
    lines = [
        f"### {payload['title']}",
        "",
        f"{env.get('date', '?')} · {env.get('device', '?')} · torch {env.get('torch', '?')} (CUDA {env.get('cuda')})"
        f" · triton {env.get('triton')}",
        "",
    ]
    if not payload["rows"]:
        return "\n".join(lines + ["(no rows: nothing was measured)"]) + "\n"
    lines += [
        "| case | impl | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['case']} | {r['impl']} | " + " | ".join(fmt_number(r["metrics"].get(m)) for m in metrics) + " |"
        )
    return "\n".join(lines) + "\n"


def main(paths: list[str]) -> int:
    """Print one table per file; a missing or unreadable file is reported and skipped
    (exit status 1 if any was), so one bad file does not lose the others' tables."""
    if not paths:
        print("usage: python benchmarks/make_results.py FILE.json [...]", file=sys.stderr)
        return 2
    status = 0
    for p in paths:
        try:
            with open(p) as f:
                payload = json.load(f)
            table = to_markdown(payload)
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"make_results: skipped {p}: {type(e).__name__}: {e}", file=sys.stderr)
            status = 1
            continue
        print(table)
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
