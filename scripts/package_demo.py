"""Package a `longvita train --recipe demo` run as the embedded demo model (maintainers).

    python scripts/package_demo.py RUN_DIR --log RUN.jsonl --wall-seconds S [--eval EVAL.json]

RUN_DIR/final is written in float16 (the package ships ~9 MB instead of ~18 MB; loading
casts it back to float32) with its tokenizer and config to ``longvita/assets/demo``, and
``train_log.json`` beside it records the command, seed, wall time, the first losses (the
test ``test_recipe_reproduces_the_recorded_first_losses`` replays them) and the held-out
accuracy of the packaged (float16) weights. Nothing is written until the weights load and
pass the held-out check against the float32 run (the packaged model must answer the same).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "longvita" / "assets" / "demo"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="the run folder (its final/ is packaged)")
    p.add_argument("--log", required=True, help="the run's `--json` output (one JSON line per step)")
    p.add_argument("--wall-seconds", type=float, required=True, help="the run's wall time, data writing included")
    p.add_argument("--seed", type=int, default=0, help="the run's --seed")
    p.add_argument("--command", default="longvita train --recipe demo", help="the command that made the run")
    p.add_argument("--machine", default=f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}")
    p.add_argument("--n", type=int, default=50, help="held-out examples per task for the recorded accuracy")
    p.add_argument("--dest", default=str(DEST))
    args = p.parse_args()

    from longvita.eval.demo import evaluate_demo
    from longvita.pipeline import load_pipeline

    steps = [json.loads(line) for line in Path(args.log).read_text().splitlines() if line.startswith("{")]
    if not steps:
        sys.exit(f"--log {args.log}: no step lines")
    with tempfile.TemporaryDirectory() as tmp:
        pipe = load_pipeline(os.path.join(args.run, "final"))
        seed = args.seed
        trained = {t: r["accuracy"] for t, r in evaluate_demo(pipe, args.n, seed=0).items()}
        pipe.model.half().save_pretrained(tmp, tokenizer=pipe.tokenizer)
        packaged = load_pipeline(tmp, dtype=torch.float32)
        accuracy = {t: r["accuracy"] for t, r in evaluate_demo(packaged, args.n, seed=0).items()}
        # float16 storage may flip an answer near a tie, no more: one example per task
        drift = {t: (trained[t], accuracy[t]) for t in trained if abs(trained[t] - accuracy[t]) > 1 / args.n + 1e-9}
        if drift:
            sys.exit(f"the float16 weights answer differently from the run's float32 ones (task: (fp32, fp16)): {drift}")
        log = {
            "command": args.command, "seed": seed, "steps": len(steps), "wall_seconds": args.wall_seconds,
            "machine": args.machine, "tokens_per_s_mean": round(sum(s["tokens_per_s"] for s in steps) / len(steps)),
            "first_losses": [s["loss"] for s in steps[:50]],
            "losses_every_250": [[s["step"], round(s["loss"], 4)] for s in steps if s["step"] % 250 == 0],
            "held_out": {"n_per_task": args.n, "seed": 0, "accuracy": accuracy},
        }
        (Path(tmp) / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
        dest = Path(args.dest)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(tmp, dest)
    dest.chmod(0o755)  # the temporary folder's 0700 / 0600 would travel with the copy
    for f in dest.iterdir():
        f.chmod(0o644)
    size = (dest / "model.safetensors").stat().st_size
    print(f"{dest}: {sorted(p.name for p in dest.iterdir())}, weights {size / 2**20:.1f} MiB; held-out {accuracy}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
