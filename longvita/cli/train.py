"""``longvita train``: one Long-VITA stage (recipe presets, overrides), CP x FSDP2 under
torchrun, checkpoints and exact resume; ``--recipe demo`` trains the demo model from
scratch on generated data."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from longvita.cli import checks
from longvita.cli._ranks import Ranks, add_rank_flags, ranks, world_size
from longvita.cli.errors import UsageError
from longvita.parallel.dims import ParallelDims
from longvita.runtime.train import recipe as recipes
from longvita.runtime.train.checkpoint import CHECKPOINT_DIR, complete_checkpoints

TINY_SEQ_LEN = 256  # the tiny default model: a step takes about a second on a CPU
DEFAULT_STEPS = 10

# the train command's own flags a --config file may set too (a flag given on the command line
# wins), with what each takes
_CONFIG_FLAGS = {"stage": int, "recipe": str, "model": str, "data": str, "steps": int, "seed": int, "cp": int,
                 "checkpoint_every": int, "keep": int}
_DEFAULTS = {"stage": 1, "recipe": "paper", "model": None, "data": None, "steps": None, "seed": 0, "cp": None,
             "checkpoint_every": 0, "keep": 2}


@dataclass(frozen=True)
class TrainOptions:
    stage: int
    recipe_name: str
    recipe: recipes.StageRecipe
    model: str | None
    data: str | None
    steps: int
    seed: int
    precision: str
    activation_checkpointing: str
    cp: int | None
    ulysses: int
    out: str
    resume: bool
    checkpoint_every: int
    keep: int
    device: str
    timeout: int
    json: bool

    @property
    def demo(self) -> bool:
        return self.recipe_name == "demo"

    @classmethod
    def from_args(cls, args) -> "TrainOptions":
        """Every check that needs no model, before anything is loaded: errors name the flag
        (or the --config key). --config's train-flag keys apply where the flag was not given."""
        config = recipes.load_config(checks.check_file("--config", args.config)) if args.config is not None else {}
        given = {}
        for key, kind in _CONFIG_FLAGS.items():
            value = getattr(args, key)
            if value is None and key in config:
                value = config.pop(key)
                if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                    raise UsageError(f"--config {args.config}: {key} must be {'an integer' if kind is int else 'a string'}, "
                                     f"got {value!r}")
            else:
                config.pop(key, None)
            given[key] = _DEFAULTS[key] if value is None else value
        if given["recipe"] not in recipes.RECIPES:
            raise UsageError(f"--recipe must be one of {', '.join(recipes.RECIPES)}, got {given['recipe']!r}")
        demo = given["recipe"] == "demo"
        stage = checks.check_int("--stage", given["stage"], 1, 4)
        steps = checks.check_int("--steps", recipes.DEMO_STEPS if demo and given["steps"] is None
                                 else given["steps"] if given["steps"] is not None else DEFAULT_STEPS, 1)
        world = world_size()
        cp = given["cp"]
        if cp is not None and (checks.check_int("--cp", cp, 1) > world or world % cp):
            raise UsageError(f"--cp {cp} must divide the number of processes ({world})")
        ulysses = checks.check_int("--ulysses", args.ulysses, 1)
        ParallelDims.of(world, cp, ulysses)  # --ulysses must divide the CP group
        model = checks.check_model(given["model"])
        data = checks.check_file("--data", given["data"]) if given["data"] is not None else None
        out = checks.check_out_dir("--out", args.out)
        seq_len = None if args.seq_len is None else checks.check_int("--seq-len", args.seq_len, 2)
        r = _recipe(stage, given["recipe"], model, config, args, seq_len)
        done = complete_checkpoints(out)
        if args.resume and not done:
            raise UsageError(f"--resume: no complete checkpoint under {os.path.join(out, CHECKPOINT_DIR)}")
        if not args.resume and done:
            raise UsageError(f"--out {out} already holds checkpoints; pass --resume to continue, or another --out")
        precision = args.precision or ("bf16" if demo else "fp32")
        if args.activation_checkpointing is not None:  # the flag wins over the recipe
            r = recipes.apply_overrides(r, {"activation_checkpointing": {"on": "full", "off": "none"}.get(
                args.activation_checkpointing, args.activation_checkpointing)})
        ac = r.ac_policy()
        return cls(
            stage=stage, recipe_name=given["recipe"], recipe=r, model=model, data=data, steps=steps,
            seed=checks.check_seed(given["seed"]), precision=precision, activation_checkpointing=ac, cp=cp,
            ulysses=ulysses, out=out,
            resume=bool(args.resume), checkpoint_every=checks.check_int("--checkpoint-every", given["checkpoint_every"], 0),
            keep=checks.check_int("--keep", given["keep"], 1), device=checks.check_device(args.device),
            timeout=checks.check_timeout(args.timeout), json=bool(args.json),
        )


def _recipe(stage: int, name: str, model: str | None, config: dict, args, seq_len: int | None) -> recipes.StageRecipe:
    """The stage preset with --config, then --set, then --seq-len applied (later wins)."""
    r = recipes.recipe(stage, name)
    if model is None and name != "demo":  # the tiny default model
        r = recipes.apply_overrides(r, {"seq_len": TINY_SEQ_LEN})
    for flag, overrides in (("--config " + str(args.config), config), ("--set", args.set)):
        if overrides:
            try:
                r = recipes.apply_overrides(r, overrides)
            except recipes.RecipeError as exc:
                raise UsageError(f"{flag}: {exc}") from None
    if seq_len is not None:
        r = recipes.apply_overrides(r, {"seq_len": seq_len})
    return r


def add_parser(sub, fmt) -> None:
    t = sub.add_parser("train", help="train one Long-VITA stage (recipe presets, CP + FSDP under torchrun)",
                       formatter_class=fmt)
    t.add_argument("--stage", type=int, choices=[1, 2, 3, 4], help="training stage (paper, Table 2) (default: 1)")
    t.add_argument("--recipe", choices=list(recipes.RECIPES),
                   help="preset set; demo: the demo model from scratch on generated data (default: paper)")
    t.add_argument("--model", help="checkpoint folder to start from (unset: the tiny preset, random weights from --seed; "
                   "--recipe demo: the demo preset from scratch)")
    t.add_argument("--data", metavar="MANIFEST", help="training manifest (.jsonl; unset: a synthetic set in OUT/synthetic)")
    t.add_argument("--steps", type=int, help=f"optimizer steps (the cosine schedule spans them; default {recipes.DEMO_STEPS} "
                   f"for --recipe demo, else {DEFAULT_STEPS})")
    t.add_argument("--seq-len", type=int, metavar="N",
                   help=f"tokens per pack (unset: the stage's, or {TINY_SEQ_LEN} with the tiny default model)")
    t.add_argument("--seed", type=int, help="data order (and the random default model's weights) (default: 0)")
    t.add_argument("--precision", choices=["fp32", "bf16"],
                   help="compute precision (bf16: bf16 compute over fp32 master weights, fp32 gradient reduction; "
                   "default bf16 for --recipe demo, whose CPU matmuls run ~1.5x faster in it, else fp32)")
    t.add_argument("--activation-checkpointing", choices=["auto", "on", "off", *recipes.AC_CHOICES[1:]],
                   help=f"what the backward recomputes: full (on) every layer, every-other layer, mlp (keep "
                        f"attention, recompute the MLPs), none (off); auto (the recipe's default): full from "
                        f"{recipes.LONG_SEQUENCE_AC}-token packs")
    t.add_argument("--cp", type=int, metavar="N",
                   help="ranks per context-parallel group; the rest of the world is data parallel (FSDP2) (unset: all)")
    t.add_argument("--ulysses", type=int, default=1, metavar="U",
                   help="Ulysses groups of U ranks (all-to-all over heads) inside each CP group's ring; U divides --cp")
    t.add_argument("--out", default="longvita-train", metavar="DIR", help="run folder: checkpoints/, final/")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --out that verifies")
    t.add_argument("--config", metavar="FILE",
                   help="a JSON (or YAML) mapping: recipe keys, and stage/recipe/model/data/steps/seed/cp/"
                        "checkpoint_every/keep where the flag is not given")
    t.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="recipe overrides, e.g. lr_llm=1e-4 warmup_steps=0")
    t.add_argument("--checkpoint-every", type=int, metavar="N", help="steps between checkpoints; 0: at the end only (default: 0)")
    t.add_argument("--keep", type=int, metavar="K", help="complete checkpoints kept (default: 2)")
    add_rank_flags(t)
    t.add_argument("--json", action="store_true", help="one JSON line per step instead of a progress bar")
    t.set_defaults(func=run)


def run(args) -> int:
    opts = TrainOptions.from_args(args)
    with ranks(opts.device, opts.timeout) as r:
        return _train(opts, r)


def _write_dataset(opts: TrainOptions, r: Ranks, image_size: int) -> str:
    """The generated training set (demo or synthetic) in OUT, written once by rank 0."""
    from longvita.files import OutputError

    sub = "demo-data" if opts.demo else "synthetic"
    folder = os.path.join(opts.out, sub)
    manifest = os.path.join(folder, "manifest.jsonl")
    if r.rank == 0 and not os.path.isfile(manifest):
        try:
            if opts.demo:
                from longvita.data.demo import write_demo_dataset

                write_demo_dataset(folder, recipes.DEMO_SAMPLES, opts.seed)
            else:
                from longvita.data.synthetic import write_synthetic_dataset

                write_synthetic_dataset(folder, 64, opts.seed, image_size=image_size)
        except OSError as exc:
            raise OutputError(f"--out {opts.out}: cannot write the generated data set in {sub}/ "
                              f"({exc.strerror or exc})") from None
    if r.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return manifest


def _train(opts: TrainOptions, r: Ranks) -> int:
    import torch

    from longvita.data import MediaConfig, pack_stream
    from longvita.pipeline import load_pipeline, peek_config
    from longvita.runtime.train.trainer import Trainer

    # paper recipes start from the tiny model by default; the demo recipe from scratch
    model = opts.model if opts.model is not None or opts.demo else "tiny"
    untrained = "demo" if opts.demo and opts.model is None else None
    limit = peek_config(model, untrained=untrained).text.max_position_embeddings
    if opts.recipe.seq_len > limit:
        raise UsageError(f"--seq-len {opts.recipe.seq_len}: more than the model's max_position_embeddings ({limit})")
    pipe = load_pipeline(model, dtype=torch.float32, device=r.device, seed=opts.seed, untrained=untrained)
    data = opts.data or _write_dataset(opts, r, pipe.model.config.vision.image_size)
    # the generated demo set is written as a curriculum (longvita.data.demo): read in order
    stream = pack_stream(data, pipe.tokenizer, pipe.special, MediaConfig.for_model(pipe.model.config),
                         seq_len=opts.recipe.seq_len, reset=opts.recipe.reset, seed=opts.seed,
                         in_order=opts.demo and opts.data is None)
    trainer = Trainer(pipe.model, pipe.tokenizer, opts.recipe, stream, steps=opts.steps, out=opts.out, cp=opts.cp,
                      ulysses=opts.ulysses,
                      checkpoint_every=opts.checkpoint_every, keep=opts.keep,
                      activation_checkpointing=opts.activation_checkpointing,
                      mixed_precision=None if opts.precision == "fp32" else opts.precision)
    if opts.resume:
        import warnings

        path = trainer.resume(on_fallback=lambda message: warnings.warn(message, RuntimeWarning, stacklevel=2))
        if r.rank == 0 and not opts.json:
            print(f"resumed from {path} (step {trainer.step})", file=sys.stderr)
    from tqdm.auto import tqdm

    bar = tqdm(total=opts.steps, initial=trainer.step, desc=f"stage {opts.recipe.stage}", unit="step",
               disable=True if r.rank != 0 or opts.json else None)
    for result in trainer.run():
        if r.rank == 0 and opts.json:
            print(json.dumps({"step": result.step, "loss": result.loss, "lr": result.lr,
                              "tokens_per_s": result.tokens_per_s, "skipped_media": result.skipped_media,
                              "grad_norm": result.grad_norm}), flush=True)
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}")
        bar.update()
    bar.close()
    final = trainer.save_final()
    if r.rank == 0 and not opts.json:
        print(f"[{opts.steps} steps, stage {opts.recipe.stage} ({opts.recipe.name}), {r.world} rank"
              f"{'s' if r.world > 1 else ''}, cp {trainer.dims.cp}; model written to {final}]", file=sys.stderr)
    return 0
