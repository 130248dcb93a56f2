"""What the LM head's public functions check and prepare before any launch: shapes,
dtypes, devices and values of their arguments (each error names the argument), DTensor
arguments, and the cast ``torch.autocast`` would apply."""

from __future__ import annotations

import contextlib
import math
import sys

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _autocast_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """What ``F.linear`` would see under ``torch.autocast``: floating inputs (not fp64) cast
    to the autocast dtype. The kernels below then run with autocast off, so every GEMM in
    them sees one dtype (under autocast a cuBLAS call inside would come back in bf16
    while its ``out=`` buffer is fp32). Outside autocast the inputs pass unchanged."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type) or hidden.dtype == torch.float64:
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _no_autocast(t: torch.Tensor):
    """Autocast off on t's device type: the cores below cast nothing themselves (a device
    type without autocast, such as meta, has nothing to turn off)."""
    if not torch.amp.is_autocast_available(t.device.type):
        return contextlib.nullcontext()
    return torch.autocast(t.device.type, enabled=False)


def _plain_tensors(hidden, weight, bias=None):
    """DTensor arguments (FSDP2 parameters used outside their module's forward, tensor
    parallelism): a weight or bias is gathered (``full_tensor``) when no gradient flows
    to it -- evaluation, a frozen head -- and refused with what to do when one does: the
    reduction of its gradient over ranks (sum? FSDP's average?) is FSDP's business, so
    the call belongs where FSDP has unsharded the parameter. Looked up in sys.modules:
    no import (a DTensor cannot exist unless its module is loaded)."""
    dtensor_mod = sys.modules.get("torch.distributed.tensor")
    if dtensor_mod is None:
        return hidden, weight, bias
    dtensor = dtensor_mod.DTensor
    if isinstance(hidden, dtensor):
        raise ValueError(
            f"hidden is a DTensor (placements {tuple(hidden.placements)}): pass this rank's rows as a plain "
            "tensor (hidden.to_local()), or hidden.full_tensor() for the whole batch"
        )
    out = []
    for name, t in (("weight", weight), ("bias", bias)):
        if isinstance(t, dtensor):
            if t.requires_grad and torch.is_grad_enabled():
                raise ValueError(
                    f"{name} is a DTensor (placements {tuple(t.placements)}) that needs a gradient, e.g. an FSDP2 "
                    "parameter used outside its module's forward: call linear_cross_entropy inside that module's "
                    "forward, or in a method registered with torch.distributed.fsdp.register_fsdp_forward_method("
                    "module, name), so that FSDP gathers it and reduces its gradient (under torch.no_grad() it is "
                    "gathered here)"
                )
            t = t.full_tensor()
        out.append(t)
    return hidden, out[0], out[1]


def _check_hidden_weight(hidden, weight, two_d: bool):
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if two_d and hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (N, H), got shape {tuple(hidden.shape)}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (..., H) with at least one leading dim, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on hidden's device {hidden.device}, got {weight.device}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, got shape {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have V >= 1 and H >= 1, got shape {tuple(weight.shape)}")


def _check_bias(bias, weight):
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise ValueError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype or bias.device != weight.device:
        raise ValueError(f"bias must have weight's dtype {weight.dtype} and device {weight.device}, "
                         f"got {bias.dtype} on {bias.device}")


def _check_options(label_smoothing, z_loss, softcap):
    def real(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not real(label_smoothing) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not real(z_loss) or z_loss < 0.0:
        raise ValueError(f"z_loss must be a float >= 0, got {z_loss!r}")
    if softcap is not None and (not real(softcap) or softcap <= 0.0):
        raise ValueError(f"softcap must be None or a float > 0, got {softcap!r}")


def _check_labels(labels, lead, vocab, device, ignore_index):
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels must have hidden's leading shape hidden.shape[:-1] = {lead}, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels must be on hidden's device {device}, got {labels.device}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    # Value check only where it costs no device sync, and not under torch.compile (a
    # host read of tensor data would break the graph).
    if device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
