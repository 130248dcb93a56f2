"""Command line: ``longvita generate``, ``longvita train`` and ``longvita info``.

Errors in what the user gave (files, arguments, checkpoints) print one line on stderr
and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

LONG_PREFILL_TOKENS = 8192  # prompts from this long show a prefill progress bar
LONG_SEQUENCE_AC = 16384  # packs from this long recompute activations by default (memory over speed)


def _activation_checkpointing(choice: str, seq_len: int) -> bool:
    return choice == "on" or (choice == "auto" and seq_len >= LONG_SEQUENCE_AC)
EXIT_INPUT = 1  # bad input (files, arguments, checkpoints); argparse's own errors exit 2


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


# ------------------------------------------------------------------------------ info


def info_text() -> str:
    import importlib
    import platform

    import torch

    from longvita import __version__
    from longvita._ext import native_status
    from longvita.kernels._backend import kernel_backends, triton_available, triton_interpret

    lines = [f"longvita {__version__}", f"python {platform.python_version()} ({platform.machine()})"]
    for mod in ("torch", "triton", "numpy", "safetensors", "tokenizers", "PIL", "av", "transformers", "flash_attn"):
        try:
            lines.append(f"{mod} {importlib.import_module(mod).__version__}")
        except Exception:
            lines.append(f"{mod} not installed")
    cuda = torch.cuda.is_available()
    lines.append(f"torch CUDA build: {torch.version.cuda or 'no'}; CUDA available: {cuda}")
    for i in range(torch.cuda.device_count() if cuda else 0):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    lines.append(f"native extension longvita._C: {native_status()}")
    lines.append(f"triton: {'available' if triton_available() else 'not available'}"
                 f"{' (interpreter: TRITON_INTERPRET=1)' if triton_interpret() else ''}")
    lines.append(f"kernel backends (LONGVITA_BACKEND={os.environ.get('LONGVITA_BACKEND') or 'auto'}):")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    for dev in devices:
        for dtype in (torch.float32, torch.bfloat16):
            try:
                chosen = ", ".join(f"{k}={v}" for k, v in kernel_backends(dev, dtype).items())
            except (ValueError, RuntimeError) as exc:  # a LONGVITA_BACKEND that cannot run here
                chosen = f"error: {exc}"
            lines.append(f"  {dev.type} {str(dtype).replace('torch.', '')}: {chosen}")
        lines.append(f"  {dev.type}: ring_attention=p2p over {_ring_transport(dev)}")
    return "\n".join(lines)


def _ring_transport(device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


# ------------------------------------------------------------------------------ generate


def _synthetic_image(seed: int, size: int = 96):
    """A deterministic test picture (gradients and a disc), so the demo needs no files."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size, int(size * 1.5)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx / w * 255, yy / h * 255, np.full_like(xx, rng.integers(0, 255))], -1)
    cy, cx, r = h / 2, w / 3, h / 4
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    return Image.fromarray(img.astype("uint8"), "RGB")


def _demo_picture(seed: int):
    """What the built-in example picture for the trained demo model shows: (rng to draw it
    with, colour, shape), all from ``seed``."""
    import random

    from longvita.data.demo import COLOURS, SHAPES

    rng = random.Random(f"generate-{seed}")
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    return rng, colour, shape


def _demo_image(seed: int, size: int):
    """The built-in example picture: one coloured shape (``longvita.data.demo``) drawn from
    ``seed``. Returns (image, what it shows: "blue triangle")."""
    from longvita.data.demo import shape_image

    rng, colour, shape = _demo_picture(seed)
    return shape_image(rng, colour, shape, size), f"{colour} {shape}"


def demo_image_answer(seed: int) -> str:
    """The colour of ``_demo_image(seed)``: the right answer of the default generate."""
    return _demo_picture(seed)[1]


def _check_model_dir(model: str | None) -> None:
    """--model, when given, is a folder with a config.json (generate and train alike)."""
    if model is None:
        return
    from longvita.pipeline import TINY

    if model == TINY and not os.path.isdir(model):  # the random tiny preset, by name
        return
    if not os.path.isdir(model):
        raise CLIError(f"--model {model}: checkpoint folder does not exist")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise CLIError(f"--model {model}: no config.json in the folder")


def check_generate_args(args) -> None:
    """Every check that needs no model, before anything is loaded: errors name the flag."""
    if args.max_new_tokens < 0:
        raise CLIError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.max_tiles < 1:
        raise CLIError(f"--max-tiles must be >= 1, got {args.max_tiles}")
    if args.max_frames < 1:
        raise CLIError(f"--max-frames must be >= 1, got {args.max_frames}")
    if not args.temperature >= 0:  # also rejects nan
        raise CLIError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_k < 0:
        raise CLIError(f"--top-k must be >= 0 (0: off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p must be in (0, 1] (1: off), got {args.top_p}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise CLIError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.cp is not None and args.cp != world:
        raise CLIError(
            f"--cp {args.cp}: the context-parallel group is every process, and there are {world} "
            f"(run under torchrun --nproc-per-node {args.cp})"
        )
    if world > 1 and args.prefill_chunk is not None:
        raise CLIError("--prefill-chunk runs in one process; under context parallelism each rank holds 1/P of the prompt")
    for flag, paths in (("--image", args.image or []), ("--video", [args.video] if args.video else [])):
        for path in paths:
            if not os.path.exists(path):
                raise CLIError(f"{flag} {path}: file does not exist")
            if not os.path.isfile(path):
                raise CLIError(f"{flag} {path}: not a file")
    _check_model_dir(args.model)
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise CLIError(f"--device must be cpu or cuda[:N], got {args.device!r}")


DTYPES = ("float32", "bfloat16", "float16")


def _on_ranks(args, body) -> int:
    """``body(args, torch, rank, world)`` in the process group torchrun set up (every rank
    one context-parallel group, one GPU per rank), or alone; the group is torn down after."""
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available on this machine")
    rank, world = _maybe_init_distributed(torch, args.device)
    if world > 1 and args.device == "cuda":  # one GPU per rank
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    try:
        return body(args, torch, rank, world)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def cmd_generate(args) -> int:
    check_generate_args(args)
    return _on_ranks(args, _generate)


def _generate(args, torch, rank: int, world: int) -> int:
    from longvita.data import build_inputs, load_image, read_video, tile_image
    from longvita.data.demo import DEMO_QUESTION
    from longvita.pipeline import DEFAULT_SOURCE, DEMO_SOURCE, load_pipeline

    dtype = getattr(torch, args.dtype)  # one of DTYPES
    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, dtype=dtype, device=args.device, seed=args.seed)
    model, cfg = pipe.model, pipe.model.config
    load_s = time.perf_counter() - t0

    size = cfg.vision.image_size
    pre = args.preprocess or cfg.preprocess  # the checkpoint's family unless overridden

    segments: list = []
    frames = None
    shown = None  # what the built-in picture shows, said on stderr so the answer can be checked
    if args.image:
        for path in args.image:
            image = load_image(path, image_size=size, max_num=args.max_tiles)
            segments.append(tile_image(image, image_size=size, max_num=args.max_tiles, preprocess=pre))
    elif pipe.source in (DEMO_SOURCE, DEFAULT_SOURCE) and not args.video:  # a built-in model: a built-in picture
        if pipe.source == DEMO_SOURCE:  # the trained demo: a picture like those it learnt from
            image, shown = _demo_image(args.seed, size)
            segments.append(tile_image(image, image_size=size, max_num=args.max_tiles, preprocess=pre))
        else:
            segments.append(tile_image(_synthetic_image(args.seed), image_size=size, max_num=args.max_tiles, preprocess=pre))
    if args.prompt is None:
        args.prompt = DEMO_QUESTION if pipe.source == DEMO_SOURCE and not args.video else "Describe the image."
    if shown is not None and rank == 0 and not args.json:
        print(f"[the embedded demo model, asked {args.prompt!r} about a generated picture of a {shown} (--seed "
              f"{args.seed}); --image and --prompt ask your own]", file=sys.stderr)
    if args.video:
        # raw: frames stay uint8 (a quarter of float32) until the vision tower normalises a chunk
        video = read_video(args.video, max_frames=args.max_frames, image_size=size, preprocess=pre, raw=True)
        segments.append(video.pixel_values)
        frames = video.indices
    # media then a newline then the question: "<image>\n{question}", as both families (and
    # the training manifests, longvita.data.training) lay a user turn out
    segments.append("\n" + args.prompt if segments else args.prompt)
    prompt = build_inputs(pipe.tokenizer, pipe.special, segments, tokens_per_tile=cfg.tokens_per_tile, preprocess=pre)
    n_prompt = int(prompt.input_ids.numel())
    limit = cfg.text.max_position_embeddings
    if n_prompt + args.max_new_tokens > limit:
        raise CLIError(
            f"--prompt: the prompt is {n_prompt} tokens (with its media) and --max-new-tokens adds "
            f"{args.max_new_tokens}, more than the model's max_position_embeddings ({limit})"
        )
    input_ids = prompt.input_ids.to(pipe.device)
    tiles = 0 if prompt.pixel_values is None else int(prompt.pixel_values.shape[0])
    inputs_s = time.perf_counter() - t0 - load_s

    from longvita.model import Sampling

    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    gen = torch.Generator(device=pipe.device).manual_seed(args.seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    from tqdm.auto import tqdm

    # a long prefill shows its progress on rank 0 (stderr; tqdm hides itself off a terminal)
    prefill_bar = tqdm(total=100, desc="prefill", unit="%", leave=False,
                       disable=True if rank != 0 or n_prompt < LONG_PREFILL_TOKENS else None)

    def prefill_progress(fraction: float) -> None:
        prefill_bar.update(round(100 * fraction) - prefill_bar.n)

    # media stay on the CPU (video frames as uint8): the model moves and normalises one
    # bounded chunk of tiles at a time, and under CP each rank only the tiles it owns
    if world > 1:
        from longvita.dist.inference import ContextParallelGenerator

        cp = ContextParallelGenerator(model)
        stream = cp.generate(
            input_ids, prompt.pixel_values, max_new_tokens=args.max_new_tokens,
            eos_token_id=pipe.special.eos_token_id, sampling=sampling, generator=gen,
            prefill_progress=prefill_progress,
        )
    else:
        cp = None
        stream = model.generate(
            input_ids, prompt.pixel_values, max_new_tokens=args.max_new_tokens, eos_token_id=pipe.special.eos_token_id,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=gen,
            prefill_chunk=args.prefill_chunk, prefill_progress=prefill_progress,
        )

    tokens: list[int] = []
    t1 = time.perf_counter()
    prefill_s = None
    # decode progress on rank 0 for long generations (stderr; tqdm hides itself off a terminal)
    progress = tqdm(total=args.max_new_tokens, desc="decoding", unit="token", leave=False,
                    disable=True if rank != 0 or args.max_new_tokens < 64 else None)
    for tok in stream:
        if prefill_s is None:  # the first token comes out of the prefill
            prefill_s = time.perf_counter() - t1
            prefill_bar.close()
        tokens.append(tok)
        progress.update()
    progress.close()
    prefill_bar.close()
    total_s = time.perf_counter() - t1
    if prefill_s is None:  # --max-new-tokens 0: nothing was computed
        prefill_s = 0.0
    decode_s = total_s - prefill_s
    decoded = max(len(tokens) - 1, 0)  # the first token is the prefill's
    decode_tps = decoded / decode_s if decode_s > 0 else 0.0
    text = pipe.tokenizer.decode(tokens, skip_special_tokens=True)
    # cached tokens per rank: the prompt and every generated token but the last
    if cp is not None:
        kv_tokens = cp.stats.kv_tokens
    else:
        kv_tokens = [n_prompt + len(tokens) - 1 if tokens else 0]
    peak = _gather(_peak_memory_gib(torch, pipe.device), world)
    if rank == 0:
        if args.json:
            print(json.dumps({
                "tokens": tokens, "text": text, "prompt_tokens": n_prompt, "tiles": tiles,
                "load_s": load_s, "inputs_s": inputs_s, "prefill_s": prefill_s, "decode_s": decode_s,
                "seconds": total_s, "decode_tokens_per_s": decode_tps,
                "tokens_per_s": len(tokens) / total_s if total_s > 0 else 0.0,
                "cp": world, "kv_tokens": kv_tokens, "peak_memory_gib": peak,
                "frames": frames, "preprocess": pre, "model": pipe.source, "world_size": world,
            }))
        else:
            print(text)
            print(f"[{len(tokens)} tokens; load {load_s:.2f} s, inputs {inputs_s:.2f} s, prefill {prefill_s:.2f} s "
                  f"({n_prompt} tokens, {tiles} tiles, {world} rank{'s' if world > 1 else ''}), decode {decode_s:.2f} s "
                  f"({decode_tps:.1f} tokens/s); model {pipe.source}]", file=sys.stderr)
    return 0


def _peak_memory_gib(torch, device) -> float:
    """Peak memory of this process: the CUDA allocator's on a GPU, the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _gather(value, world: int) -> list:
    """``value`` of every rank, in rank order (a list of one alone)."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def _maybe_init_distributed(torch, device: str):
    """Under torchrun every rank joins one process group, which generation uses as its
    context-parallel group; alone, nothing is initialised. NCCL only when the tensors
    are on GPUs: CPU tensors need gloo even on a machine with CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


# ------------------------------------------------------------------------------ train

TINY_SEQ_LEN = 256  # the tiny default model: a step takes about a second on a CPU
DEMO_SAMPLES = 57000  # the demo recipe's generated training set: one pass of the default run (~50 s to write)
DEMO_STEPS = 7100  # the demo recipe's length: with the data, under 30 minutes on 2 CPU cores
DEFAULT_STEPS = 10


# the train command's own flags a --config file may set too (a flag given on the command line wins)
_TRAIN_CONFIG_FLAGS = ("stage", "recipe", "model", "data", "steps", "seed", "cp", "checkpoint_every", "keep")


def _train_config(args) -> dict:
    """--config's recipe keys; its train-flag keys are applied to ``args`` where the flag
    was left at its default."""
    from longvita.train_recipe import load_config

    if not args.config:
        return {}
    config = load_config(args.config)
    defaults = vars(build_parser().parse_args(["train"]))
    for key in _TRAIN_CONFIG_FLAGS:
        if key in config:
            value = config.pop(key)
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    return config


def _train_recipe(args, config: dict):
    """The stage preset with --config, then --set, then --seq-len applied (later wins)."""
    from longvita.train_recipe import apply_overrides, recipe

    r = recipe(args.stage, args.recipe)
    if args.model is None and args.recipe != "demo":
        r = apply_overrides(r, {"seq_len": TINY_SEQ_LEN})
    if config:
        try:
            r = apply_overrides(r, config)
        except ValueError as exc:
            raise CLIError(f"--config {args.config}: {exc}") from None
    if args.set:
        try:
            r = apply_overrides(r, args.set)
        except ValueError as exc:
            raise CLIError(f"--set: {exc}") from None
    if args.seq_len is not None:
        r = apply_overrides(r, {"seq_len": args.seq_len})
    return r


def check_train_args(args):
    """Every check that needs no model, before anything is loaded: errors name the flag.
    Returns the recipe (preset + overrides)."""
    if args.config is not None and not os.path.isfile(args.config):
        raise CLIError(f"--config {args.config}: file does not exist")
    config = _train_config(args)
    if args.steps is None:
        args.steps = DEMO_STEPS if args.recipe == "demo" else DEFAULT_STEPS
    if args.precision is None:
        args.precision = "bf16" if args.recipe == "demo" else "fp32"
    for key, kind in (("stage", int), ("steps", int), ("seed", int), ("checkpoint_every", int), ("keep", int)):
        if not isinstance(getattr(args, key), kind) or isinstance(getattr(args, key), bool):
            raise CLIError(f"--config {args.config}: {key} must be an integer, got {getattr(args, key)!r}")
    if args.cp is not None and (not isinstance(args.cp, int) or isinstance(args.cp, bool)):
        raise CLIError(f"--config {args.config}: cp must be an integer, got {args.cp!r}")
    if args.stage not in (1, 2, 3, 4):
        raise CLIError(f"--stage must be 1, 2, 3 or 4, got {args.stage}")
    if args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    if args.seq_len is not None and args.seq_len < 2:
        raise CLIError(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.checkpoint_every < 0:
        raise CLIError(f"--checkpoint-every must be >= 0 (0: only at the end), got {args.checkpoint_every}")
    if args.keep < 1:
        raise CLIError(f"--keep must be >= 1, got {args.keep}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cp = args.cp if args.cp is not None else world
    if cp < 1 or world % cp:
        raise CLIError(f"--cp {args.cp} must divide the number of processes ({world})")
    _check_model_dir(args.model)
    if args.data is not None and not os.path.isfile(args.data):
        raise CLIError(f"--data {args.data}: manifest file does not exist")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise CLIError(f"--device must be cpu or cuda, got {args.device!r}")
    from longvita.train_recipe import latest_checkpoint

    ckpt = latest_checkpoint(args.out)
    if args.resume and ckpt is None:
        raise CLIError(f"--resume: no complete checkpoint under {os.path.join(args.out, 'checkpoints')}")
    if not args.resume and ckpt is not None:
        raise CLIError(f"--out {args.out} already holds checkpoints; pass --resume to continue, or another --out")
    return _train_recipe(args, config)


def cmd_train(args) -> int:
    recipe = check_train_args(args)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available on this machine")
    rank, world = _maybe_init_distributed(torch, args.device)
    if args.device == "cuda":
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(args.device)
    try:
        return _train(args, recipe, torch, rank, world)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(args, recipe, torch, rank: int, world: int) -> int:
    from longvita.dist.trainer import Trainer, make_stream
    from longvita.pipeline import load_pipeline

    demo = args.recipe == "demo"
    model = args.model if args.model is not None or demo else "tiny"  # paper recipes: the tiny model by default
    pipe = load_pipeline(model, dtype=torch.float32, device=args.device, seed=args.seed,
                         untrained="demo" if demo and args.model is None else None)
    data = args.data
    if data is None and demo:  # the generated demo set, written once by rank 0
        data = os.path.join(args.out, "demo-data", "manifest.jsonl")
        if rank == 0 and not os.path.isfile(data):
            from longvita.data.demo import write_demo_dataset

            write_demo_dataset(os.path.join(args.out, "demo-data"), DEMO_SAMPLES, args.seed)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
    if data is None:  # the synthetic set, written once by rank 0
        data = os.path.join(args.out, "synthetic", "manifest.jsonl")
        if rank == 0 and not os.path.isfile(data):
            from longvita.data.synthetic import write_synthetic_dataset

            write_synthetic_dataset(os.path.join(args.out, "synthetic"), 64, args.seed,
                                    image_size=pipe.model.config.vision.image_size)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
    # the generated demo set is written as a curriculum (longvita.data.demo): read in order
    stream = make_stream(data, pipe.tokenizer, pipe.special, pipe.model.config, seq_len=recipe.seq_len,
                         reset=recipe.reset, seed=args.seed, in_order=demo and args.data is None)
    cp = args.cp if args.cp is not None else world
    trainer = Trainer(pipe.model, pipe.tokenizer, recipe, stream, steps=args.steps, out=args.out, cp=cp,
                      checkpoint_every=args.checkpoint_every, keep=args.keep, seed=args.seed,
                      activation_checkpointing=_activation_checkpointing(args.activation_checkpointing, recipe.seq_len),
                      mixed_precision=None if args.precision == "fp32" else args.precision)
    if args.resume:
        path = trainer.resume()
        if rank == 0 and not args.json:
            print(f"resumed from {path} (step {trainer.step})", file=sys.stderr)
    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=trainer.step, desc=f"stage {recipe.stage}", unit="step",
               disable=True if rank != 0 or args.json else None)
    for result in trainer.run():
        if rank == 0 and args.json:
            print(json.dumps({"step": result.step, "loss": result.loss, "lr": result.lr,
                              "tokens_per_s": result.tokens_per_s, "skipped_media": result.skipped_media,
                              "grad_norm": result.grad_norm}), flush=True)
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}")
        bar.update()
    bar.close()
    final = trainer.save_final()
    if rank == 0 and not args.json:
        print(f"[{args.steps} steps, stage {recipe.stage} ({recipe.name}), {world} rank{'s' if world > 1 else ''}, "
              f"cp {cp}; model written to {final}]", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------ main


_MODEL_HELP = ("checkpoint folder, or 'tiny' (the tiny preset with random weights from --seed); unset: the embedded "
               "default, the trained demo model the package ships (else the tiny preset)")


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error rule: one line on stderr (not the usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _DefaultsFormatter(argparse.HelpFormatter):
    """--help shows each flag's default (flags that default to unset say so in their help)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    fmt = _DefaultsFormatter
    p = _Parser(prog="longvita", description="Long-VITA vision-language models at 128K-1M tokens", formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="generate text from images/video and a prompt", formatter_class=fmt)
    g.add_argument("--model", help=_MODEL_HELP)
    g.add_argument("--image", nargs="+", metavar="F", help="image file(s), in order")
    g.add_argument("--video", metavar="F", help="video file (decoded at <= 1 frame per second)")
    g.add_argument("--prompt", help="user text (unset: the demo's question, or 'Describe the image.' for other models)")
    g.add_argument("--max-new-tokens", type=int, default=16, help="most tokens to generate")
    g.add_argument("--max-tiles", type=int, default=12, help="most tiles per image (dynamic tiling)")
    g.add_argument("--max-frames", type=int, default=4096, help="most video frames")
    g.add_argument("--preprocess", choices=["long-vita", "internvl"],
                   help="preprocessing family (tiles, video frames, token layout); unset: the checkpoint's")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0: off")
    g.add_argument("--top-p", type=float, default=1.0, help="sample within the top-p probability mass; 1: off")
    g.add_argument("--prefill-chunk", type=int, metavar="N",
                   help="one process: run the prompt through the KV cache N tokens at a time (bounds activation memory)")
    g.add_argument("--cp", type=int, metavar="N",
                   help="context-parallel ranks; must equal the torchrun world size (unset: all of them)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (and the random default model's weights)")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate)
    t = sub.add_parser("train", help="train one Long-VITA stage (recipe presets, CP + FSDP under torchrun)",
                       formatter_class=fmt)
    t.add_argument("--stage", type=int, choices=[1, 2, 3, 4], default=1, help="training stage (paper, Table 2)")
    t.add_argument("--recipe", choices=["paper", "long-vita-release", "demo"], default="paper",
                   help="preset set; demo: the demo model from scratch on generated data")
    t.add_argument("--model", help="checkpoint folder to start from (unset: the tiny preset, random weights from --seed; "
                   "--recipe demo: the demo preset from scratch)")
    t.add_argument("--data", metavar="MANIFEST", help="training manifest (.jsonl; unset: a synthetic set in OUT/synthetic)")
    t.add_argument("--steps", type=int, help=f"optimizer steps (the cosine schedule spans them; default {DEMO_STEPS} "
                   f"for --recipe demo, else {DEFAULT_STEPS})")
    t.add_argument("--seq-len", type=int, metavar="N",
                   help=f"tokens per pack (unset: the stage's, or {TINY_SEQ_LEN} with the tiny default model)")
    t.add_argument("--seed", type=int, default=0, help="data order (and the random default model's weights)")
    t.add_argument("--precision", choices=["fp32", "bf16"],
                   help="compute precision (bf16: bf16 compute over fp32 master weights, fp32 gradient reduction; "
                   "default bf16 for --recipe demo, whose CPU matmuls run ~1.5x faster in it, else fp32)")
    t.add_argument("--activation-checkpointing", choices=["auto", "on", "off"], default="auto",
                   help=f"recompute each layer in the backward; auto: on from {LONG_SEQUENCE_AC} tokens")
    t.add_argument("--cp", type=int, metavar="N",
                   help="ranks per context-parallel group; the rest of the world is data parallel (FSDP2) (unset: all)")
    t.add_argument("--out", default="longvita-train", metavar="DIR", help="run folder: checkpoints/, final/")
    t.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    t.add_argument("--config", metavar="FILE",
                   help="a JSON (or YAML) mapping: recipe keys, and stage/recipe/model/data/steps/seed/cp/"
                        "checkpoint_every/keep where the flag is not given")
    t.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="recipe overrides, e.g. lr_llm=1e-4 warmup_steps=0")
    t.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="steps between checkpoints; 0: at the end only")
    t.add_argument("--keep", type=int, default=2, metavar="K", help="complete checkpoints kept")
    t.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    t.add_argument("--json", action="store_true", help="one JSON line per step instead of a progress bar")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluations: needle in a haystack (visual and text)", formatter_class=fmt)
    esub = e.add_subparsers(dest="eval_command", required=True, parser_class=_Parser)
    n = esub.add_parser("niah", formatter_class=fmt,
                        help="needle-in-a-haystack grid, teacher-forced, context-parallel under torchrun")
    n.add_argument("--mode", choices=["visual", "text"], default="visual", help="V-NIAH (frames) or text NIAH (tokens)")
    n.add_argument("--model", help=_MODEL_HELP)
    n.add_argument("--haystack", metavar="PATH",
                   help="visual: a video file or a folder of videos (1 fps); text: a text file or a folder of .txt/.md "
                        "(unset: generated frames / filler)")
    n.add_argument("--needles", metavar="JSONL",
                   help="needles file (text: id, sentence, question, answer; visual: id, image, question, answer); "
                        "unset: a generated set")
    n.add_argument("--num-needles", type=int, default=2, help="generated needles when --needles is unset")
    n.add_argument("--frames", metavar="N,N,...", help=f"visual haystack lengths in frames (default {NIAH_DEFAULT_FRAMES})")
    n.add_argument("--context", metavar="N,N,...", help=f"text cell lengths in tokens (default {NIAH_DEFAULT_CONTEXT})")
    n.add_argument("--depths", default=NIAH_DEFAULT_DEPTHS, metavar="D,D,...", help="needle depths, percent")
    n.add_argument("--distractors", type=int, default=0, help="text: distractor sentences with other cities")
    n.add_argument("--preprocess", choices=["long-vita", "internvl"], help="preprocessing family (unset: the checkpoint's)")
    n.add_argument("--out", default="longvita-niah", metavar="DIR",
                   help="results.jsonl, results.csv, heatmap.png and the haystack feature cache")
    n.add_argument("--resume", action="store_true", help="skip the cells already in DIR/results.jsonl")
    n.add_argument("--seed", type=int, default=0, help="needles, haystack, distractors (and the random default model)")
    n.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations")
    n.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    n.add_argument("--json", action="store_true", help="print one JSON summary line (no progress bar)")
    n.set_defaults(func=cmd_eval_niah)
    d = esub.add_parser("demo", formatter_class=fmt, help="accuracy per task on held-out generated demo examples")
    d.add_argument("--model", help=_MODEL_HELP)
    d.add_argument("--n", type=int, default=20, help="held-out examples per task")
    d.add_argument("--tasks", metavar="T,T,...", help="tasks to ask (default: all; frame needs PyAV)")
    d.add_argument("--seed", type=int, default=0, help="the held-out draw (never the training set's)")
    d.add_argument("--device", default="cpu", help="cpu or cuda")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=cmd_eval_demo)
    i = sub.add_parser("info", help="versions, devices, native extension and kernel backends", formatter_class=fmt)
    i.set_defaults(func=lambda args: print(info_text()) or 0)
    return p


# ----------------------------------------------------------------------------------
# eval niah
# ----------------------------------------------------------------------------------

NIAH_DEFAULT_FRAMES = "4,8,16,32"
NIAH_DEFAULT_CONTEXT = "256,512,1024,2048"
NIAH_DEFAULT_DEPTHS = "0,25,50,75,100"


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise CLIError(f"{flag}: expected positive integers, got {text!r}")
    return values


def _depth_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"--depths: expected comma-separated percentages, got {text!r}") from None
    if not values or any(not 0 <= v <= 100 for v in values):
        raise CLIError(f"--depths: expected percentages in [0, 100], got {text!r}")
    return values


def check_niah_args(args) -> None:
    """Everything checkable before torch loads; one line naming the flag."""
    _check_model_dir(args.model)
    if args.mode == "visual":
        args.lengths = _int_list("--frames", args.frames or NIAH_DEFAULT_FRAMES)
        if args.context:
            raise CLIError("--context is for --mode text; the visual grid's lengths are --frames")
    else:
        args.lengths = _int_list("--context", args.context or NIAH_DEFAULT_CONTEXT)
        if args.frames:
            raise CLIError("--frames is for --mode visual; the text grid's lengths are --context")
    args.depth_values = _depth_list(args.depths)
    if args.haystack is not None and not os.path.exists(args.haystack):
        raise CLIError(f"--haystack: {args.haystack!r} does not exist")
    if args.needles is not None and not os.path.isfile(args.needles):
        raise CLIError(f"--needles: {args.needles!r} is not a file")
    if args.distractors < 0:
        raise CLIError(f"--distractors must be >= 0, got {args.distractors}")
    if args.num_needles < 1:
        raise CLIError(f"--num-needles must be >= 1, got {args.num_needles}")
    if args.mode == "text" and args.num_needles > 16:
        raise CLIError(f"--num-needles: at most 16 generated text needles (one per city), got {args.num_needles}")


def cmd_eval_niah(args) -> int:
    check_niah_args(args)
    return _on_ranks(args, _eval_niah)


def _eval_niah(args, torch, rank: int, world: int) -> int:
    from longvita.eval.niah import NiahGrid, default_needles, load_needles, run_niah, summary
    from longvita.pipeline import load_pipeline

    dtype = getattr(torch, args.dtype)  # one of DTYPES
    pipe = load_pipeline(args.model, dtype=dtype, device=args.device, seed=args.seed)
    size = pipe.model.config.vision.image_size
    grid = NiahGrid(args.mode, args.lengths, args.depth_values, args.distractors, args.seed)
    if args.needles:
        needles = load_needles(args.needles, args.mode, size)
    else:
        needles = default_needles(args.mode, args.num_needles, args.seed, size)
    t0 = time.perf_counter()
    rows = run_niah(pipe, grid, needles, args.out, haystack=args.haystack,
                    preprocess=args.preprocess or pipe.model.config.preprocess, resume=args.resume,
                    show_progress=not args.json)
    result = summary(rows)
    result.update(out=args.out, seconds=round(time.perf_counter() - t0, 3), world_size=world, model=pipe.source)
    if rank == 0:
        if args.json:
            print(json.dumps(result))
        else:
            by = ", ".join(f"{k}: {v:.0%}" for k, v in result.get("by_length", {}).items())
            print(f"{args.mode} NIAH: {result['cells']} cells, accuracy {result.get('accuracy', 0):.1%} ({by}); "
                  f"table {os.path.join(args.out, 'results.jsonl')}, heatmap {os.path.join(args.out, 'heatmap.png')}")
    return 0


def cmd_eval_demo(args) -> int:
    _check_model_dir(args.model)
    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    import torch
    from tqdm.auto import tqdm

    from longvita.data.demo import TASKS
    from longvita.eval.demo import evaluate_demo
    from longvita.pipeline import load_pipeline

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available on this machine")
    tasks = None
    if args.tasks:
        tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise CLIError(f"--tasks: unknown task(s) {', '.join(bad) or '(none)'}; choose from {', '.join(TASKS)}")
    pipe = load_pipeline(args.model, device=args.device, seed=args.seed)
    t0 = time.perf_counter()
    bar = tqdm(desc="eval demo", unit="example", disable=True if args.json else None)
    result = evaluate_demo(pipe, args.n, args.seed, tasks, progress=bar.update)
    bar.close()
    summary = {t: round(r["accuracy"], 4) for t, r in result.items()}
    if args.json:
        print(json.dumps({"accuracy": summary, "n_per_task": args.n, "seed": args.seed, "model": pipe.source,
                          "seconds": round(time.perf_counter() - t0, 2),
                          "wrong": {t: r["wrong"] for t, r in result.items() if r["wrong"]}}))
    else:
        for t, r in result.items():
            print(f"{t:10s} {r['accuracy']:7.1%}  ({r['n']} held-out examples)")
        print(f"[model {pipe.source}; {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return 0


def _rank() -> int:
    """This process's rank under torchrun (0 alone): only rank 0 prints errors."""
    return int(os.environ.get("RANK", "0"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        # a user-facing warning (e.g. a video cut short): one line, like errors, once
        if _rank() == 0:
            print(f"longvita {args.command}: warning: {str(message).splitlines()[0]}", file=sys.stderr)

    try:
        with warnings.catch_warnings():  # restores showwarning when main returns
            warnings.showwarning = one_line_warning
            return args.func(args)
    except KeyboardInterrupt:
        if _rank() == 0:
            print("longvita: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors: one line, no traceback
        if not _is_user_error(exc):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if _rank() == 0:  # every rank sees the same bad input; say it once
            print(f"longvita {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_INPUT


def _is_user_error(exc: Exception) -> bool:
    if isinstance(exc, CLIError):  # argument errors: answer without importing torch
        return True
    from longvita.data import InputError
    from longvita.dist.trainer import TrainingDiverged
    from longvita.model import CheckpointError

    return isinstance(exc, (CLIError, TrainingDiverged, CheckpointError, InputError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError))


if __name__ == "__main__":
    sys.exit(main())
