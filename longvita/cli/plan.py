"""``longvita plan``: the per-rank memory of a generate or train run before it runs
(``runtime/capacity.py``), whether it fits the GPUs, and the longest length that does."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from longvita.cli import checks
from longvita.cli.errors import UsageError

PLAN_MODEL_HELP = ("a preset (long-vita-14b, demo, tiny) or a checkpoint folder (only its config.json is read)")
AC_FLAG_CHOICES = ("auto", "none", "full", "every-other", "mlp")


@dataclass(frozen=True)
class PlanOptions:
    mode: str
    model: str
    tokens: int
    gpus: int
    gpu_gib: float
    cp: int
    ulysses: int
    prefill_chunk: int | None
    new_tokens: int
    tiles: int
    stage: int
    recipe: str
    activation_checkpointing: str
    precision: str
    labelled: float
    layers: int | None
    json: bool

    @classmethod
    def from_args(cls, args) -> "PlanOptions":
        from longvita.parallel.dims import ParallelConfigError, ParallelDims

        gpus = checks.check_int("--gpus", args.gpus, 1, 1 << 20)
        cp = gpus if args.cp is None else checks.check_int("--cp", args.cp, 1, gpus)
        ulysses = checks.check_int("--ulysses", args.ulysses, 1, cp)
        try:
            ParallelDims.of(gpus, cp, ulysses)
        except ParallelConfigError as exc:
            raise UsageError(str(exc).replace("the number of processes", "--gpus")) from None
        model = args.model
        if not isinstance(model, str) or not model:
            raise UsageError(f"--model must be a preset or a checkpoint folder, got {model!r}")
        if model.lower() not in ("long-vita-14b", "demo", "tiny") or os.path.isdir(model):
            checks.check_model(model)
        chunk = None if args.prefill_chunk is None else checks.token_count("--prefill-chunk", args.prefill_chunk)
        if args.mode == "train" and chunk is not None:
            raise UsageError("--prefill-chunk is for generate; a training step runs the whole pack")
        return cls(
            mode=args.mode, model=model, tokens=checks.token_count("--tokens", args.tokens),
            gpus=gpus, gpu_gib=checks.check_number("--gpu-gib", args.gpu_gib, 0, 1 << 20, open_min=True),
            cp=cp, ulysses=ulysses, prefill_chunk=chunk,
            new_tokens=checks.check_int("--new-tokens", args.new_tokens, 0, 1 << 24),
            tiles=checks.check_int("--tiles", args.tiles, 0, 1 << 20),
            stage=checks.check_int("--stage", args.stage, 1, 4), recipe=args.recipe,
            activation_checkpointing=args.activation_checkpointing, precision=args.precision,
            labelled=checks.check_number("--labelled", args.labelled, 0, 1, open_min=True),
            layers=None if args.layers is None else checks.check_int("--layers", args.layers, 1, 1024),
            json=bool(args.json),
        )


def add_parser(sub, fmt) -> None:
    p = sub.add_parser("plan", formatter_class=fmt,
                       help="per-GPU memory of a generate or train run before it runs, and the longest length that fits")
    p.add_argument("mode", choices=("generate", "train"), help="which run to plan")
    p.add_argument("--model", default="long-vita-14b", help=PLAN_MODEL_HELP)
    p.add_argument("--tokens", default="128K", help="tokens in the prompt (generate) or pack (train): 131072, 128K, 1M")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) in the run")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU in GiB (H100: 80, H200: 141)")
    p.add_argument("--cp", type=int, default=None, help="ranks per context-parallel group (default: all GPUs)")
    p.add_argument("--ulysses", type=int, default=1, help="Ulysses (all-to-all) degree inside each CP group")
    p.add_argument("--prefill-chunk", default=None, help="generate: prefill this many tokens per rank at a time")
    p.add_argument("--new-tokens", type=int, default=256, help="generate: tokens decoded after the prompt")
    p.add_argument("--tiles", type=int, default=0, help="image tiles (448 px) among the tokens")
    p.add_argument("--stage", type=int, default=3, help="train: the recipe stage (1-4), which decides what trains")
    p.add_argument("--recipe", default="paper", choices=("paper", "long-vita-release", "demo"), help="train: the recipe")
    p.add_argument("--activation-checkpointing", default="auto", choices=AC_FLAG_CHOICES,
                   help="train: what the backward recomputes (auto: full from 16K-token packs)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                   help="train: bf16 autocast over fp32 masters, or fp32")
    p.add_argument("--labelled", type=float, default=1.0, help="train: fraction of rows with a label")
    p.add_argument("--layers", type=int, default=None, help="keep this many decoder layers (as the benchmarks do)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    opts = PlanOptions.from_args(args)
    from longvita.parallel.ulysses import check_ulysses_heads
    from longvita.runtime.capacity import GIB, longest_fitting, param_counts

    cfg = _config(opts.model)
    if opts.layers is not None:
        cfg.text.num_layers = opts.layers
    check_ulysses_heads(opts.ulysses, cfg.text.num_heads, cfg.text.num_kv_heads)
    counts = param_counts(cfg)

    def plan_at(tokens: int):
        return _plan(opts, cfg, counts, tokens)

    plan = plan_at(opts.tokens)
    longest = longest_fitting(plan_at, limit=1 << 24, resolution=1024)
    if opts.json:
        out = plan.to_dict()
        out.update(model=opts.model, longest_tokens=longest, limit_tokens=1 << 24)
        print(json.dumps(out))
        return 0
    d = plan.to_dict()
    where = f"{opts.gpus} GPU{'s' if opts.gpus > 1 else ''} of {opts.gpu_gib:g} GiB"
    par = f"cp {opts.cp}" + (f" (ulysses {opts.ulysses} x ring {opts.cp // opts.ulysses})" if opts.ulysses > 1 else "")
    what = (f"train stage {opts.stage} ({opts.recipe}), {opts.precision}" if opts.mode == "train"
            else f"generate, bf16, {opts.new_tokens} new tokens"
            + (f", prefill chunk {opts.prefill_chunk}" if opts.prefill_chunk else ""))
    print(f"{opts.model}: {what}; {opts.tokens:,} tokens"
          + (f" with {opts.tiles} tiles" if opts.tiles else "") + f" on {where}, {par}")
    print("per-rank memory (GiB):")
    for name, gib in d["items_gib"].items():
        print(f"  {name:24s} {gib:9.2f}")
    for phase, gib in d["phases_gib"].items():
        mark = "  <- peak" if phase == d["peak_phase"] else ""
        print(f"  at {phase:21s} {gib:9.2f}{mark}")
    verdict = "fits" if plan.fits else "does NOT fit"
    print(f"peak {plan.peak_bytes / GIB:.2f} GiB of {opts.gpu_gib:g}: {verdict} "
          f"({(plan.gpu_bytes - plan.peak_bytes) / GIB:+.2f} GiB headroom)")
    if longest >= 1 << 24:
        print("longest length that fits: more than 16M tokens")
    elif longest:
        print(f"longest length that fits: {longest:,} tokens (same settings, to 1K)")
    else:
        print("longest length that fits: none (not even 1K tokens: the weights alone may not fit)")
    for note in d["notes"]:
        print(f"note: {note}")
    print("not counted: the CUDA context and allocator fragmentation (leave 1-2 GiB), NCCL's own buffers")
    return 0


def _config(model: str):
    from longvita.model import preset
    from longvita.model.checkpoint import read_config

    if os.path.isdir(model):
        return read_config(model)
    return preset(model.lower())


def _plan(opts: PlanOptions, cfg, counts, tokens: int):
    from longvita.runtime.capacity import generate_memory, train_memory

    if opts.mode == "generate":
        return generate_memory(cfg, tokens, gpus=opts.gpus, cp=opts.cp, ulysses=opts.ulysses,
                               prefill_chunk=opts.prefill_chunk, new_tokens=opts.new_tokens, tiles=opts.tiles,
                               gpu_gib=opts.gpu_gib, counts=counts)
    return train_memory(cfg, tokens, stage=opts.stage, recipe_name=opts.recipe, gpus=opts.gpus, cp=opts.cp,
                        ulysses=opts.ulysses, activation_checkpointing=opts.activation_checkpointing,
                        precision=opts.precision, tiles=opts.tiles, labelled=opts.labelled, gpu_gib=opts.gpu_gib,
                        counts=counts)
