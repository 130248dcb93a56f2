"""Parallelism and memory policies applied to a plain model from outside, in one function
with a fixed order (as torchtitan's ``parallelize_*``):

1. activation checkpointing: torch's composable ``checkpoint`` applied to each ViT block
   and decoder layer (recomputed in the backward, so activation memory grows with one
   layer's, not every layer's). The composable form, not ``checkpoint_wrapper``: it hooks
   the module in place, so parameter names (optimizer groups, checkpoints) do not change;
2. (``torch.compile`` of the blocks would come here, after checkpointing, before FSDP);
3. FSDP2 (``fully_shard``): each ViT block and decoder layer is its own unit, then the
   root ``PackedLoss`` (embeddings, projector, final norm and LM head), over the mesh of
   every rank. bf16 compute over fp32 masters through FSDP2's mixed-precision policy.

Context parallelism needs nothing here: it lives in the attention objects the loss passes
to the model (``runtime.train.loss``).
"""

from __future__ import annotations

import torch

from longvita.model import LongVITA
from longvita.runtime.train.loss import PackedLoss

__all__ = ["apply_activation_checkpointing", "parallelize", "shard_model", "sum_gradients_loss"]


def apply_activation_checkpointing(model: LongVITA) -> LongVITA:
    """Recompute every decoder layer and ViT block of ``model`` in the backward (torch's
    composable, non-reentrant ``checkpoint``), in place; parameter names are unchanged. Under
    CP the recompute runs the ring again on every rank alike; without gradients (inference)
    nothing is saved or recomputed."""
    from torch.distributed._composable import checkpoint

    for block in list(model.vision.layers) + list(model.text.layers):
        checkpoint(block)
    return model


def shard_model(module: torch.nn.Module, mesh, *, mp_policy=None) -> torch.nn.Module:
    """FSDP2 over ``mesh`` (a 1-D DeviceMesh of every rank the parameters are sharded over):
    each ViT block and decoder layer its own unit, then ``module`` itself (a ``LongVITA`` or
    the ``PackedLoss`` around one) as the root. Returns ``module``.

    FSDP2 AVERAGES gradients over the mesh, while ``packed_loss``'s shares need them
    summed: back-propagate ``sum_gradients_loss(loss, mesh)``. (Setting FSDP's divide factor
    to 1 would say the same, but gloo lacks the PREMUL_SUM reduction it uses, and the CPU
    tests run on gloo.)"""
    from torch.distributed.fsdp import fully_shard

    model = module.model if isinstance(module, PackedLoss) else module
    kwargs = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in model.vision.layers:
        fully_shard(block, **kwargs)
    for layer in model.text.layers:
        fully_shard(layer, **kwargs)
    fully_shard(module, **kwargs)
    return module


def sum_gradients_loss(loss: torch.Tensor, mesh) -> torch.Tensor:
    """What to back-propagate through a module sharded by ``shard_model`` so that FSDP2's
    average of the ranks' gradients is their sum (report ``loss`` itself)."""
    return loss * mesh.size()


def parallelize(model: LongVITA, fsdp_mesh=None, *, activation_checkpointing: bool = False,
                mixed_precision: str | None = None) -> PackedLoss:
    """The training module for ``model``: ``PackedLoss(model)`` with the policies above, in
    their order. ``fsdp_mesh``: shard over it (None: parameters stay whole on every rank).
    ``mixed_precision='bf16'`` under FSDP2: bf16 parameters in compute, fp32 gradient
    reduction (without FSDP the trainer's autocast does the casting). Set ``requires_grad``
    of frozen modules before calling: FSDP2 reads it when it shards."""
    if mixed_precision not in (None, "bf16"):
        raise ValueError(f"mixed_precision must be None or 'bf16', got {mixed_precision!r}")
    if activation_checkpointing:  # 1. before FSDP, as torchtitan orders them
        apply_activation_checkpointing(model)
    module = PackedLoss(model)
    if fsdp_mesh is not None:  # 3.
        mp_policy = None
        if mixed_precision == "bf16":
            from torch.distributed.fsdp import MixedPrecisionPolicy

            mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        shard_model(module, fsdp_mesh, mp_policy=mp_policy)
    return module
