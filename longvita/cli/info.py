"""``longvita info``: versions, devices, the native extension and the backend every kernel
family runs on each device (the resolver's own answer)."""

from __future__ import annotations

import os


def add_parser(sub, fmt) -> None:
    i = sub.add_parser("info", help="versions, devices, native extension and kernel backends", formatter_class=fmt)
    i.set_defaults(func=lambda args: print(info_text()) or 0)


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
        lines.append(f"  {dev.type}: ring_attention=p2p over {'nccl' if dev.type == 'cuda' else 'gloo'}")
    return "\n".join(lines)
