"""``longvita generate``: text from images, a video and a prompt, in one process or
context-parallel under torchrun (every rank one CP group)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from longvita.cli import checks
from longvita.cli._ranks import Ranks, add_rank_flags, ranks, world_size
from longvita.cli.errors import UsageError
from longvita.parallel.dims import ParallelDims

DTYPES = ("float32", "bfloat16", "float16")
LONG_PREFILL_TOKENS = 8192  # prompts from this long show a prefill progress bar
MODEL_HELP = ("checkpoint folder, or 'tiny' (the tiny preset with random weights from --seed); unset: the embedded "
              "default, the trained demo model the package ships (else the tiny preset)")


@dataclass(frozen=True)
class GenerateOptions:
    model: str | None
    images: tuple[str, ...]
    video: str | None
    prompt: str | None
    max_new_tokens: int
    max_tiles: int
    max_frames: int
    preprocess: str | None
    temperature: float
    top_k: int
    top_p: float
    prefill_chunk: int | None
    ulysses: int
    split_special_tokens: bool
    seed: int
    dtype: str
    device: str
    timeout: int
    json: bool

    @classmethod
    def from_args(cls, args) -> "GenerateOptions":
        """Every check that needs no model, before anything is loaded: errors name the flag."""
        world = world_size()
        if args.cp is not None and args.cp != world:
            raise UsageError(f"--cp {args.cp}: the context-parallel group is every process, and there are {world} "
                             f"(run under torchrun --nproc-per-node {args.cp})")
        ulysses = checks.check_int("--ulysses", args.ulysses, 1)
        ParallelDims.of(world, world, ulysses)  # --ulysses must divide the CP group
        return cls(
            model=checks.check_model(args.model),
            images=tuple(checks.check_file("--image", p) for p in args.image or ()),
            video=checks.check_file("--video", args.video) if args.video is not None else None,
            prompt=checks.check_text("--prompt", args.prompt),
            max_new_tokens=checks.check_int("--max-new-tokens", args.max_new_tokens, 0),
            max_tiles=checks.check_int("--max-tiles", args.max_tiles, 1, checks.MAX_TILES),
            max_frames=checks.check_int("--max-frames", args.max_frames, 1),
            preprocess=args.preprocess,
            temperature=checks.check_number("--temperature", args.temperature, 0.0, hint=" (0: greedy)"),
            top_k=checks.check_int("--top-k", args.top_k, 0),
            top_p=checks.check_number("--top-p", args.top_p, 0.0, 1.0, open_min=True, hint=" (in (0, 1]; 1: off)"),
            prefill_chunk=None if args.prefill_chunk is None else checks.check_int("--prefill-chunk", args.prefill_chunk, 1),
            ulysses=ulysses,
            split_special_tokens=bool(args.split_special_tokens),
            seed=checks.check_seed(args.seed),
            dtype=args.dtype,
            device=checks.check_device(args.device),
            timeout=checks.check_timeout(args.timeout),
            json=bool(args.json),
        )


def add_parser(sub, fmt) -> None:
    g = sub.add_parser("generate", help="generate text from images/video and a prompt", formatter_class=fmt)
    g.add_argument("--model", help=MODEL_HELP)
    g.add_argument("--image", nargs="+", metavar="F", help="image file(s), in order")
    g.add_argument("--video", metavar="F", help="video file (decoded at <= 1 frame per second)")
    g.add_argument("--prompt", help="user text (unset: the demo's question, or 'Describe the image.' for other models)")
    g.add_argument("--max-new-tokens", type=int, default=16, help="most tokens to generate")
    g.add_argument("--max-tiles", type=int, default=12, help=f"most tiles per image (dynamic tiling; at most {checks.MAX_TILES})")
    g.add_argument("--max-frames", type=int, default=4096, help="most video frames")
    g.add_argument("--preprocess", choices=["long-vita", "internvl"],
                   help="preprocessing family (tiles, video frames, token layout); unset: the checkpoint's")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0: off")
    g.add_argument("--top-p", type=float, default=1.0, help="sample within the top-p probability mass; 1: off")
    g.add_argument("--prefill-chunk", type=int, metavar="N",
                   help="run the prompt through the KV cache N tokens at a time (under torchrun: N per rank), so "
                        "activation memory is bounded by N, not by the prompt")
    g.add_argument("--cp", type=int, metavar="N",
                   help="context-parallel ranks; must equal the torchrun world size (unset: all of them)")
    g.add_argument("--ulysses", type=int, default=1, metavar="U",
                   help="under torchrun: Ulysses groups of U ranks (all-to-all over heads) inside the ring; U divides "
                        "--cp, and the model's heads")
    g.add_argument("--split-special-tokens", action="store_true",
                   help="treat chat-control tokens typed in --prompt (<|im_start|>, <|im_end|>) as plain text "
                        "(for untrusted prompts; by default they act as control tokens, as in transformers)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (and the random default model's weights)")
    add_rank_flags(g, DTYPES)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=run)


def run(args) -> int:
    opts = GenerateOptions.from_args(args)
    with ranks(opts.device, opts.timeout) as r:
        return _generate(opts, r)


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


def _segments(opts: GenerateOptions, pipe, pre: str):
    """The prompt's media and text, and what the built-in picture shows (None otherwise)."""
    from longvita.data import load_image, read_video, tile_image
    from longvita.data.demo import DEMO_QUESTION, demo_picture
    from longvita.data.synthetic import synthetic_picture
    from longvita.pipeline import DEFAULT_SOURCE, DEMO_SOURCE

    size = pipe.model.config.vision.image_size
    segments, frames, shown = [], None, None
    for path in opts.images:
        image = load_image(path, image_size=size, max_num=opts.max_tiles)
        segments.append(tile_image(image, image_size=size, max_num=opts.max_tiles, preprocess=pre))
    if not opts.images and not opts.video and pipe.source in (DEMO_SOURCE, DEFAULT_SOURCE):
        if pipe.source == DEMO_SOURCE:  # the trained demo: a picture like those it learnt from
            image, colour, shape = demo_picture(opts.seed, size)
            shown = f"{colour} {shape}"
        else:
            image = synthetic_picture(opts.seed)
        segments.append(tile_image(image, image_size=size, max_num=opts.max_tiles, preprocess=pre))
    prompt = opts.prompt
    if prompt is None:
        prompt = DEMO_QUESTION if pipe.source == DEMO_SOURCE and not opts.video else "Describe the image."
    if opts.video:
        # raw: frames stay uint8 (a quarter of float32) until the vision tower normalises a chunk
        video = read_video(opts.video, max_frames=opts.max_frames, image_size=size, preprocess=pre, raw=True)
        segments.append(video.pixel_values)
        frames = video.indices
    # media then a newline then the question: "<image>\n{question}", as both families (and
    # the training manifests, longvita.data.training) lay a user turn out
    segments.append("\n" + prompt if segments else prompt)
    return segments, prompt, frames, shown


def _generate(opts: GenerateOptions, r: Ranks) -> int:
    import torch

    from longvita.data import build_inputs
    from longvita.pipeline import load_pipeline
    from longvita.runtime import ContextParallelPlan, LocalPlan, NonFiniteLogits, Sampling, generate

    t0 = time.perf_counter()
    pipe = load_pipeline(opts.model, dtype=getattr(torch, opts.dtype), device=r.device, seed=opts.seed)
    cfg = pipe.model.config
    load_s = time.perf_counter() - t0
    pre = opts.preprocess or cfg.preprocess  # the checkpoint's family unless overridden
    segments, prompt_text, frames, shown = _segments(opts, pipe, pre)
    if shown is not None and r.rank == 0 and not opts.json:
        print(f"[the embedded demo model, asked {prompt_text!r} about a generated picture of a {shown} (--seed "
              f"{opts.seed}); --image and --prompt ask your own]", file=sys.stderr)
    prompt = build_inputs(pipe.tokenizer, pipe.special, segments, tokens_per_tile=cfg.tokens_per_tile, preprocess=pre,
                          split_special_tokens=opts.split_special_tokens)
    n_prompt = int(prompt.input_ids.numel())
    limit = cfg.text.max_position_embeddings
    if n_prompt + opts.max_new_tokens > limit:
        raise UsageError(
            f"--prompt: the prompt is {n_prompt} tokens (with its media) and --max-new-tokens adds "
            f"{opts.max_new_tokens}, more than the model's max_position_embeddings ({limit})"
        )
    if r.world > 1 and n_prompt < 2 * r.world:
        raise UsageError(f"--prompt: {n_prompt} tokens are too few for context parallelism over {r.world} ranks "
                         f"(at least {2 * r.world})")
    tiles = 0 if prompt.pixel_values is None else int(prompt.pixel_values.shape[0])
    inputs_s = time.perf_counter() - t0 - load_s

    gen = torch.Generator(device=pipe.device).manual_seed(opts.seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    from tqdm.auto import tqdm

    # a long prefill shows its progress on rank 0 (stderr; tqdm hides itself off a terminal)
    prefill_bar = tqdm(total=100, desc="prefill", unit="%", leave=False,
                       disable=True if r.rank != 0 or n_prompt < LONG_PREFILL_TOKENS else None)
    if r.world > 1:
        mesh = ParallelDims.of(r.world, r.world, opts.ulysses).build(pipe.device.type)
        plan = ContextParallelPlan(mesh.cp, prefill_chunk=opts.prefill_chunk)
    else:
        plan = LocalPlan(opts.prefill_chunk)
    # media stay on the CPU (video frames as uint8): the model moves and normalises one
    # bounded chunk of tiles at a time, and under CP each rank only the tiles it owns
    stream = generate(pipe.model, prompt.input_ids, prompt.pixel_values, plan=plan, max_new_tokens=opts.max_new_tokens,
                      eos_token_id=pipe.special.eos_token_id,
                      sampling=Sampling(opts.temperature, opts.top_k, opts.top_p), generator=gen,
                      prefill_progress=lambda f: prefill_bar.update(round(100 * f) - prefill_bar.n))
    tokens: list[int] = []
    t1 = time.perf_counter()
    prefill_s = None
    # decode progress on rank 0 for long generations (stderr; tqdm hides itself off a terminal)
    progress = tqdm(total=opts.max_new_tokens, desc="decoding", unit="token", leave=False,
                    disable=True if r.rank != 0 or opts.max_new_tokens < 64 else None)
    try:
        for tok in stream:
            if prefill_s is None:  # the first token comes out of the prefill
                prefill_s = time.perf_counter() - t1
                prefill_bar.close()
            tokens.append(tok)
            progress.update()
    except NonFiniteLogits as exc:
        raise NonFiniteLogits(f"--model {pipe.source}: {exc}") from None
    finally:
        progress.close()
        prefill_bar.close()
    total_s = time.perf_counter() - t1
    prefill_s = prefill_s or 0.0  # --max-new-tokens 0: nothing was computed
    decode_s = total_s - prefill_s
    decoded = max(len(tokens) - 1, 0)  # the first token is the prefill's
    decode_tps = decoded / decode_s if decode_s > 0 else 0.0
    text = pipe.tokenizer.decode(tokens, skip_special_tokens=True)
    kv_tokens = plan.stats.kv_tokens if tokens else [0] * r.world
    peak = _gather(_peak_memory_gib(torch, pipe.device), r.world)
    if r.rank == 0:
        if opts.json:
            print(json.dumps({
                "tokens": tokens, "text": text, "prompt_tokens": n_prompt, "tiles": tiles,
                "load_s": load_s, "inputs_s": inputs_s, "prefill_s": prefill_s, "decode_s": decode_s,
                "seconds": total_s, "decode_tokens_per_s": decode_tps,
                "tokens_per_s": len(tokens) / total_s if total_s > 0 else 0.0,
                "cp": r.world, "kv_tokens": kv_tokens, "peak_memory_gib": peak,
                "frames": frames, "preprocess": pre, "model": pipe.source, "world_size": r.world,
            }))
        else:
            print(text)
            print(f"[{len(tokens)} tokens; load {load_s:.2f} s, inputs {inputs_s:.2f} s, prefill {prefill_s:.2f} s "
                  f"({n_prompt} tokens, {tiles} tiles, {r.world} rank{'s' if r.world > 1 else ''}), decode {decode_s:.2f} s "
                  f"({decode_tps:.1f} tokens/s); model {pipe.source}]", file=sys.stderr)
    return 0
