"""``longvita eval demo``: the demo model's accuracy per task on held-out generated examples."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from longvita.cli import checks
from longvita.cli._ranks import ranks
from longvita.cli.errors import UsageError
from longvita.cli.generate import MODEL_HELP


@dataclass(frozen=True)
class DemoEvalOptions:
    model: str | None
    n: int
    tasks: tuple[str, ...] | None
    seed: int
    device: str
    json: bool

    @classmethod
    def from_args(cls, args) -> "DemoEvalOptions":
        tasks = None
        if args.tasks is not None:
            from longvita.data.demo import TASKS

            tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
            bad = [t for t in tasks if t not in TASKS]
            if bad or not tasks:
                raise UsageError(f"--tasks: unknown task(s) {', '.join(bad) or '(none)'}; choose from {', '.join(TASKS)}")
        return cls(model=checks.check_model(args.model), n=checks.check_int("--n", args.n, 1, 100_000), tasks=tasks,
                   seed=checks.check_seed(args.seed), device=checks.check_device(args.device), json=bool(args.json))


def add_parser(esub, fmt) -> None:
    d = esub.add_parser("demo", formatter_class=fmt, help="accuracy per task on held-out generated demo examples")
    d.add_argument("--model", help=MODEL_HELP)
    d.add_argument("--n", type=int, default=20, help="held-out examples per task")
    d.add_argument("--tasks", metavar="T,T,...", help="tasks to ask (default: all; frame needs PyAV)")
    d.add_argument("--seed", type=int, default=0, help="the held-out draw (never the training set's)")
    d.add_argument("--device", default="cpu", help="cpu or cuda")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=run)


def run(args) -> int:
    opts = DemoEvalOptions.from_args(args)
    with ranks(opts.device, checks.DEFAULT_TIMEOUT_S) as r:
        if r.world > 1:
            raise UsageError("eval demo runs in one process (the examples are short); run it without torchrun")
        return _eval_demo(opts, r.device)


def _eval_demo(opts: DemoEvalOptions, device: str) -> int:
    from tqdm.auto import tqdm

    from longvita.eval.demo import evaluate_demo
    from longvita.pipeline import load_pipeline

    pipe = load_pipeline(opts.model, device=device, seed=opts.seed)
    t0 = time.perf_counter()
    bar = tqdm(desc="eval demo", unit="example", disable=True if opts.json else None)
    result = evaluate_demo(pipe, opts.n, opts.seed, opts.tasks, progress=bar.update)
    bar.close()
    summary = {t: round(r["accuracy"], 4) for t, r in result.items()}
    if opts.json:
        print(json.dumps({"accuracy": summary, "n_per_task": opts.n, "seed": opts.seed, "model": pipe.source,
                          "seconds": round(time.perf_counter() - t0, 2),
                          "wrong": {t: r["wrong"] for t, r in result.items() if r["wrong"]}}))
    else:
        for t, r in result.items():
            print(f"{t:10s} {r['accuracy']:7.1%}  ({r['n']} held-out examples)")
        print(f"[model {pipe.source}; {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return 0
