"""Command line: ``longvita generate`` and ``longvita info``.

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

EXIT_USAGE = 2
EXIT_INPUT = 1


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


# ------------------------------------------------------------------------------ info


def info_text() -> str:
    import importlib
    import platform

    import torch

    from longvita import __version__
    from longvita._ext import native_status
    from longvita.kernels._backend import resolve_backend, triton_available, triton_interpret

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
    lines.append("kernel backends (auto):")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    for dev in devices:
        b = resolve_backend(dev)
        lines.append(f"  {dev.type}: varlen_attention={b}, lm_head={b}, pixel_shuffle={_pixel_shuffle_backend(dev)}, ring_attention=p2p over {_ring_transport(dev)}")
    return "\n".join(lines)


def _pixel_shuffle_backend(device) -> str:
    try:
        from longvita.kernels.pixel_shuffle import active_backend
    except ImportError:
        from longvita.kernels._backend import resolve_backend

        return resolve_backend(device)
    return active_backend(device)


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


def _load_model(args, torch, vocab_size: int | None):
    from longvita.model import LongVITA, preset

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    if args.model is None:
        torch.manual_seed(args.seed)
        config = preset("tiny")
        config.text.vocab_size = vocab_size  # every generated id decodes with the built-in tokenizer
        model = LongVITA(config).to(device=device, dtype=dtype).eval()
        with torch.no_grad():  # visible structure in random weights: scale like a trained net
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.5 / p.shape[-1] ** 0.5)
        return model, None
    return LongVITA.from_pretrained(args.model, dtype=dtype, device=device), args.model


def cmd_generate(args) -> int:
    import torch

    from longvita.data import (
        SpecialTokens,
        build_default_tokenizer,
        build_inputs,
        load_image,
        load_tokenizer,
        read_video,
        tile_image,
    )

    if args.max_new_tokens < 0:
        raise CLIError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available on this machine")
    rank, world = _maybe_init_distributed(torch)

    if args.model is None:
        tokenizer = build_default_tokenizer()
        model, folder = _load_model(args, torch, tokenizer.get_vocab_size())
    else:  # weights first: a broken checkpoint is reported before a missing tokenizer
        model, folder = _load_model(args, torch, None)
        tokenizer = load_tokenizer(args.model)
    cfg = model.config
    special = SpecialTokens.from_tokenizer(tokenizer)
    cfg.image_token_ids = special.context_token_ids
    size = cfg.vision.image_size
    pre = args.preprocess or cfg.preprocess  # the checkpoint's family unless overridden

    segments: list = []
    frames = None
    if args.image:
        for path in args.image:
            image = load_image(path, image_size=size, max_num=args.max_tiles)
            segments.append(tile_image(image, image_size=size, max_num=args.max_tiles, preprocess=pre))
    elif args.model is None and not args.video:
        segments.append(tile_image(_synthetic_image(args.seed), image_size=size, max_num=args.max_tiles, preprocess=pre))
    if args.video:
        video = read_video(args.video, max_frames=args.max_frames, image_size=size, preprocess=pre)
        segments.append(video.pixel_values)
        frames = video.indices
    segments.append(args.prompt)
    prompt = build_inputs(tokenizer, special, segments, tokens_per_tile=cfg.tokens_per_tile, preprocess=pre)

    device = next(model.parameters()).device
    input_ids = prompt.input_ids.to(device)
    pixels = None if prompt.pixel_values is None else prompt.pixel_values.to(device, next(model.parameters()).dtype)
    if input_ids.max() >= cfg.text.vocab_size:
        raise CLIError(f"the tokenizer produces ids up to {int(input_ids.max())} but the model's vocabulary has {cfg.text.vocab_size}")

    gen = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    tokens = []
    for tok in model.generate(
        input_ids, pixels, max_new_tokens=args.max_new_tokens, eos_token_id=special.eos_token_id,
        temperature=args.temperature, generator=gen,
    ):
        tokens.append(tok)
    elapsed = time.perf_counter() - start
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    tps = len(tokens) / elapsed if elapsed > 0 else float("inf")
    if rank == 0:
        if args.json:
            print(json.dumps({
                "tokens": tokens, "text": text, "prompt_tokens": int(input_ids.numel()),
                "tiles": 0 if pixels is None else int(pixels.shape[0]), "seconds": elapsed,
                "tokens_per_s": tps, "model": folder or "tiny (random weights)", "world_size": world,
                "frames": frames, "preprocess": pre,
            }))
        else:
            print(text)
            print(f"[{len(tokens)} tokens in {elapsed:.2f} s, {tps:.1f} tokens/s; prompt {input_ids.numel()} tokens, "
                  f"{0 if pixels is None else pixels.shape[0]} tiles; model {folder or 'tiny (random weights)'}]",
                  file=sys.stderr)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _maybe_init_distributed(torch):
    """Under torchrun every rank joins one process group (the inference runtime makes the
    prefill context-parallel over it); alone, nothing is initialised."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


# ------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longvita", description="Long-VITA vision-language models at 128K-1M tokens")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from images/video and a prompt")
    g.add_argument("--model", help="checkpoint folder (default: the tiny preset with random weights from --seed)")
    g.add_argument("--image", nargs="+", metavar="F", help="image file(s), in order")
    g.add_argument("--video", metavar="F", help="video file (decoded at <= 1 frame per second)")
    g.add_argument("--prompt", default="Describe the image.", help="user text")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--max-tiles", type=int, default=12, help="most tiles per image (dynamic tiling)")
    g.add_argument("--max-frames", type=int, default=4096, help="most video frames")
    g.add_argument("--preprocess", choices=["long-vita", "internvl"],
                   help="preprocessing family (tiles, video frames, token layout); default: the checkpoint's")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    g.add_argument("--device", default="cpu")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate)
    i = sub.add_parser("info", help="versions, devices, native extension and kernel backends")
    i.set_defaults(func=lambda args: print(info_text()) or 0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        # a user-facing warning (e.g. a video cut short): one line, like errors
        print(f"longvita {args.command}: warning: {str(message).splitlines()[0]}", file=sys.stderr)

    try:
        with warnings.catch_warnings():  # restores showwarning when main returns
            warnings.showwarning = one_line_warning
            return args.func(args)
    except KeyboardInterrupt:
        print("longvita: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors: one line, no traceback
        if not _is_user_error(exc):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"longvita {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_INPUT


def _is_user_error(exc: Exception) -> bool:
    from longvita.model import CheckpointError

    from longvita.data import InputError

    return isinstance(exc, (CLIError, CheckpointError, InputError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError))


if __name__ == "__main__":
    sys.exit(main())
