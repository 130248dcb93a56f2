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


def to_markdown(payload: dict) -> str:
    env = payload["environment"]
    metrics = payload["metrics"]
    lines = [
        f"### {payload['title']}",
        "",
        f"{env['date']} · {env['device']} · torch {env['torch']} (CUDA {env['cuda']}) · triton {env.get('triton')}",
        "",
        "| case | impl | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['case']} | {r['impl']} | " + " | ".join(fmt_number(r["metrics"].get(m)) for m in metrics) + " |"
        )
    return "\n".join(lines) + "\n"


def main(paths: list[str]) -> int:
    if not paths:
        print("usage: python benchmarks/make_results.py FILE.json [...]", file=sys.stderr)
        return 2
    for p in paths:
        with open(p) as f:
            print(to_markdown(json.load(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
