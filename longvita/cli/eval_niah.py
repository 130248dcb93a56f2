"""``longvita eval niah``: the needle-in-a-haystack grid (visual or text), teacher-forced,
context-parallel under torchrun."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from longvita.cli import checks
from longvita.cli._ranks import Ranks, add_rank_flags, ranks, world_size
from longvita.cli.errors import UsageError
from longvita.cli.generate import DTYPES, MODEL_HELP
from longvita.parallel.dims import ParallelDims

DEFAULT_FRAMES = "4,8,16,32"
DEFAULT_CONTEXT = "256,512,1024,2048"
DEFAULT_DEPTHS = "0,25,50,75,100"
MAX_TEXT_NEEDLES = 16  # one per city of LongVA's needle sentence


@dataclass(frozen=True)
class NiahOptions:
    mode: str
    model: str | None
    haystack: str | None
    needles: str | None
    num_needles: int
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    distractors: int
    preprocess: str | None
    ulysses: int
    out: str
    resume: bool
    seed: int
    dtype: str
    device: str
    timeout: int
    json: bool

    @classmethod
    def from_args(cls, args) -> "NiahOptions":
        """Everything checkable before torch loads; one line naming the flag."""
        if args.mode == "visual":
            if args.context:
                raise UsageError("--context is for --mode text; the visual grid's lengths are --frames")
            lengths = checks.int_list("--frames", args.frames or DEFAULT_FRAMES)
        else:
            if args.frames:
                raise UsageError("--frames is for --mode visual; the text grid's lengths are --context")
            lengths = checks.int_list("--context", args.context or DEFAULT_CONTEXT)
        if args.haystack is not None and not os.path.exists(args.haystack):
            raise UsageError(f"--haystack: {args.haystack!r} does not exist")
        if args.needles is not None and not os.path.isfile(args.needles):
            raise UsageError(f"--needles: {args.needles!r} is not a file")
        num_needles = checks.check_int("--num-needles", args.num_needles, 1,
                                       MAX_TEXT_NEEDLES if args.mode == "text" else 1024)
        ulysses = checks.check_int("--ulysses", args.ulysses, 1)
        ParallelDims.of(world_size(), None, ulysses)  # --ulysses must divide the CP group (every rank)
        return cls(
            mode=args.mode, model=checks.check_model(args.model), haystack=args.haystack, needles=args.needles,
            num_needles=num_needles, lengths=lengths, depths=checks.depth_list(args.depths),
            distractors=checks.check_int("--distractors", args.distractors, 0, 64), preprocess=args.preprocess,
            ulysses=ulysses,
            out=checks.check_out_dir("--out", args.out), resume=bool(args.resume), seed=checks.check_seed(args.seed),
            dtype=args.dtype, device=checks.check_device(args.device), timeout=checks.check_timeout(args.timeout),
            json=bool(args.json),
        )


def add_parser(esub, fmt) -> None:
    n = esub.add_parser("niah", formatter_class=fmt,
                        help="needle-in-a-haystack grid, teacher-forced, context-parallel under torchrun")
    n.add_argument("--mode", choices=["visual", "text"], default="visual", help="V-NIAH (frames) or text NIAH (tokens)")
    n.add_argument("--model", help=MODEL_HELP)
    n.add_argument("--haystack", metavar="PATH",
                   help="visual: a video file or a folder of videos (1 fps); text: a text file or a folder of .txt/.md "
                        "(unset: generated frames / filler)")
    n.add_argument("--needles", metavar="JSONL",
                   help="needles file (text: id, sentence, question, answer; visual: id, image, question, answer); "
                        "unset: a generated set")
    n.add_argument("--num-needles", type=int, default=2, help="generated needles when --needles is unset")
    n.add_argument("--frames", metavar="N,N,...", help=f"visual haystack lengths in frames (default {DEFAULT_FRAMES})")
    n.add_argument("--context", metavar="N,N,...", help=f"text cell lengths in tokens (default {DEFAULT_CONTEXT})")
    n.add_argument("--depths", default=DEFAULT_DEPTHS, metavar="D,D,...", help="needle depths, percent")
    n.add_argument("--distractors", type=int, default=0, help="text: distractor sentences with other cities")
    n.add_argument("--preprocess", choices=["long-vita", "internvl"], help="preprocessing family (unset: the checkpoint's)")
    n.add_argument("--ulysses", type=int, default=1, metavar="U",
                   help="under torchrun: Ulysses groups of U ranks (all-to-all over heads) inside the ring")
    n.add_argument("--out", default="longvita-niah", metavar="DIR",
                   help="results.jsonl, run.json, results.csv, heatmap.png and the haystack feature cache")
    n.add_argument("--resume", action="store_true",
                   help="skip the cells already in DIR/results.jsonl (refused when DIR holds another run's cells)")
    n.add_argument("--seed", type=int, default=0, help="needles, haystack, distractors (and the random default model)")
    add_rank_flags(n, DTYPES)
    n.add_argument("--json", action="store_true", help="print one JSON summary line (no progress bar)")
    n.set_defaults(func=run)


def run(args) -> int:
    opts = NiahOptions.from_args(args)
    with ranks(opts.device, opts.timeout) as r:
        return _eval_niah(opts, r)


# a frame takes its context tokens and two markers; the question and answer add a few dozen
_CELL_EXTRA_TOKENS = 64


def _check_lengths(opts: NiahOptions, config) -> None:
    """Every cell length against the model's positions, before any weight is read: a typo
    of a few zeros would otherwise run for hours or exhaust memory. Cells past the length
    the model was trained on (``config.trained_length``, when known) run, with one warning."""
    limit = config.text.max_position_embeddings
    longest = max(opts.lengths)
    if opts.mode == "text":
        flag, tokens = "--context", longest
        if longest > limit:
            raise UsageError(f"--context {longest}: more than the model's max_position_embeddings ({limit})")
    else:
        per_frame = config.tokens_per_tile + 2
        most = max(1, (limit - _CELL_EXTRA_TOKENS) // per_frame)
        if longest > most:
            raise UsageError(f"--frames {longest}: at {per_frame} tokens a frame, the model's "
                             f"max_position_embeddings ({limit}) holds at most {most} frames")
        flag, tokens = "--frames", longest * per_frame + _CELL_EXTRA_TOKENS
    if config.past_trained_length(tokens):
        import warnings

        from longvita.model import ContextLengthWarning

        past = [n for n in opts.lengths if config.past_trained_length(
            n if opts.mode == "text" else n * (config.tokens_per_tile + 2) + _CELL_EXTRA_TOKENS)]
        warnings.warn(f"{flag} {','.join(map(str, past))}: past the {config.trained_length} tokens the model was "
                      f"trained on (its config's longvita_trained_length); those cells measure extrapolation",
                      ContextLengthWarning, stacklevel=2)


def _eval_niah(opts: NiahOptions, r: Ranks) -> int:
    import torch

    from longvita.eval.niah import NiahGrid, default_needles, load_needles, run_niah, summary
    from longvita.parallel import check_ulysses_heads
    from longvita.pipeline import load_pipeline, peek_config

    _check_lengths(opts, peek_config(opts.model))
    pipe = load_pipeline(opts.model, dtype=getattr(torch, opts.dtype), device=r.device, seed=opts.seed)
    size = pipe.model.config.vision.image_size
    grid = NiahGrid(opts.mode, list(opts.lengths), list(opts.depths), opts.distractors, opts.seed)
    if opts.needles:
        needles = load_needles(opts.needles, opts.mode, size)
    else:
        needles = default_needles(opts.mode, opts.num_needles, opts.seed, size)
    t0 = time.perf_counter()
    cp = None
    if r.world > 1:
        t = pipe.model.config.text
        check_ulysses_heads(opts.ulysses, t.num_heads, t.num_kv_heads)
        cp = ParallelDims.of(r.world, None, opts.ulysses).build(pipe.device.type).cp
    rows = run_niah(pipe, grid, needles, opts.out, haystack=opts.haystack,
                    preprocess=opts.preprocess or pipe.model.config.preprocess, resume=opts.resume,
                    show_progress=not opts.json, group=cp)
    result = summary(rows)
    result.update(out=opts.out, seconds=round(time.perf_counter() - t0, 3), world_size=r.world, model=pipe.source)
    if r.rank == 0:
        if opts.json:
            print(json.dumps(result))
        else:
            by = ", ".join(f"{k}: {v:.0%}" for k, v in result.get("by_length", {}).items())
            print(f"{opts.mode} NIAH: {result['cells']} cells, accuracy {result.get('accuracy', 0):.1%} ({by}); "
                  f"table {os.path.join(opts.out, 'results.jsonl')}, heatmap {os.path.join(opts.out, 'heatmap.png')}")
    return 0
