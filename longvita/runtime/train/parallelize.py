"""Parallelism and memory policies applied to a plain model from outside, in one function
with a fixed order (as torchtitan's ``parallelize_*``):

1. activation checkpointing, one of ``AC_POLICIES``, with torch's composable ``checkpoint``
   (the composable form, not ``checkpoint_wrapper``: it hooks the module in place, so
   parameter names, optimizer groups and checkpoints do not change):
   - ``full``: every ViT block and decoder layer is recomputed in the backward (activation
     memory grows with one layer's, not every layer's; about one more forward of compute);
   - ``every-other``: every second block and layer (half the saving, half the recompute);
   - ``mlp``: only the MLP of every block and layer: the attention's output and its saved
     LSE are kept, so attention, the most expensive part at long context, is never
     recomputed, while the MLP's wide intermediate (4-5x the hidden size) is not kept;
   - ``none``;
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

__all__ = ["AC_POLICIES", "apply_activation_checkpointing", "parallelize", "shard_model", "sum_gradients_loss"]

AC_POLICIES = ("none", "full", "every-other", "mlp")


def apply_activation_checkpointing(model: LongVITA, policy: str = "full") -> LongVITA:
    """Recompute parts of ``model`` in the backward by ``policy`` (``AC_POLICIES``, see the
    module docstring) with torch's composable, non-reentrant ``checkpoint``, in place;
    parameter names are unchanged. Under CP the recompute runs the ring again on every rank
    alike; without gradients (inference) nothing is saved or recomputed."""
    if policy not in AC_POLICIES:
        raise ValueError(f"activation checkpointing policy must be one of {AC_POLICIES}, got {policy!r}")
    from torch.distributed._composable import checkpoint

    for blocks in (model.vision.layers, model.text.layers):
        for i, block in enumerate(blocks):
            if policy == "full" or (policy == "every-other" and i % 2 == 0):
                checkpoint(block)
            elif policy == "mlp":
                checkpoint(block.mlp)
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


def parallelize(model: LongVITA, fsdp_mesh=None, *, activation_checkpointing: bool | str = False,
                mixed_precision: str | None = None) -> PackedLoss:
    """The training module for ``model``: ``PackedLoss(model)`` with the policies above, in
    their order. ``activation_checkpointing``: a policy name, or True (``full``) / False
    (``none``). ``fsdp_mesh``: shard over it (None: parameters stay whole on every rank).
    ``mixed_precision='bf16'`` under FSDP2: bf16 parameters in compute, fp32 gradient
    reduction (without FSDP the trainer's autocast does the casting). Set ``requires_grad``
    of frozen modules before calling: FSDP2 reads it when it shards."""
    if mixed_precision not in (None, "bf16"):
        raise ValueError(f"mixed_precision must be None or 'bf16', got {mixed_precision!r}")
    policy = {True: "full", False: "none"}.get(activation_checkpointing, activation_checkpointing)
    if policy != "none":  # 1. before FSDP, as torchtitan orders them
        apply_activation_checkpointing(model, policy)
    module = PackedLoss(model)
    if fsdp_mesh is not None:  # 3.
        mp_policy = None
        if mixed_precision == "bf16":
            from torch.distributed.fsdp import MixedPrecisionPolicy

            mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        shard_model(module, fsdp_mesh, mp_policy=mp_policy)
    return module
