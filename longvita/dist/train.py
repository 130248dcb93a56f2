"""Training under context parallelism (and data parallelism): the loss of one packed batch
with exact gradients.

Every rank of a context-parallel (CP) group holds the same packed batch (ids, labels
shifted within each sample, tiles, ``cu_seqlens``); each computes only its zigzag shard
of the tokens (chunks r and 2P-1-r of every document), encoding only the tiles whose
context tokens fall in that shard, with ring attention in every decoder layer.

Exactness. Each rank returns ``sum of its valid token losses / N``, with N the count of
valid labels over the whole CP group's batch (and over every data-parallel group's batch
when ``dp_group`` is given): the sum of the returned values over all ranks is the global
mean, and the sum of every rank's gradients is the gradient of the global mean. So the
parameter gradients must be SUMMED over the ranks, not averaged: ``all_reduce_gradients``
for plain replicas, or FSDP2 (``shard_model``) with ``sum_gradients_loss``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longvita.dist.ring_attention import ring_attention
from longvita.dist.zigzag import ZigzagLayout, zigzag_layout
from longvita.model import DecoderAttention, LongVITA, positions_from_cu_seqlens

__all__ = [
    "RingAttention", "all_reduce_gradients", "apply_activation_checkpointing", "packed_loss", "shard_model",
    "sum_gradients_loss",
]

IGNORE = -100


class RingAttention(DecoderAttention):
    """Causal ring attention over the zigzag shard in every layer (differentiable)."""

    def __init__(self, layout: ZigzagLayout, group=None):
        self.layout, self.group = layout, group

    def attend(self, layer_idx, q, k, v):
        return ring_attention(q, k, v, self.layout, group=self.group, causal=True)


def _rank_world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def packed_loss(
    model: LongVITA,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    cp_group: dist.ProcessGroup | None = None,
    dp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """This rank's share of the mean cross-entropy of a packed batch (see the module
    docstring: the shares of all ranks add up to the global mean).

    input_ids, labels: (T,) the whole pack, the same on every rank of ``cp_group``; labels
        already shifted within each sample (-100 where none).
    cu_seqlens: (B+1,) int32 documents (one per sample when positions reset, ``[0, T]``
        when the pack is one document). position_ids default to restarting per document.
    cp_group: the context-parallel group (None: the default group when initialised, else
        one process). dp_group: the data-parallel group whose batches make the global mean.
    """
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must match input_ids, got {tuple(labels.shape)} and {tuple(input_ids.shape)}")
    total = input_ids.shape[0]
    if position_ids is None:
        position_ids = positions_from_cu_seqlens(cu_seqlens, total)
    # the global count of valid labels: the same on every CP rank (they hold one batch);
    # summed over the DP ranks' batches (a count, so no gradient flows through it)
    num_valid = (labels != IGNORE).sum()
    if dp_group is not None and _rank_world(dp_group)[1] > 1:
        dist.all_reduce(num_valid, group=dp_group)
    rank, world = _rank_world(cp_group)
    if world == 1:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        return model(input_ids, pixel_values, labels=labels, cu_seqlens=cu_seqlens, position_ids=position_ids,
                     max_seqlen=int(lengths.max()), num_valid=num_valid)
    layout = zigzag_layout(cu_seqlens, world, input_ids.device)
    index, valid = layout.local_to_global(rank)  # (total_local,) global row of every local row
    index, valid = index.to(input_ids.device), valid.to(input_ids.device)
    # padding rows (valid False) repeat row 0: no label, and ring attention masks them as keys
    local_labels = torch.where(valid, labels.index_select(0, index), IGNORE)
    return model(
        input_ids, pixel_values, rows=index, position_ids=position_ids.index_select(0, index),
        attention=RingAttention(layout, cp_group), labels=local_labels, num_valid=num_valid,
    )


def all_reduce_gradients(model: torch.nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum every parameter gradient over ``group`` (replicated parameters under CP)."""
    if _rank_world(group)[1] == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def apply_activation_checkpointing(model: LongVITA) -> LongVITA:
    """Recompute every decoder layer and ViT block in the backward instead of keeping its
    activations (activation memory then grows with one layer's, not with every layer's).
    Applied from outside, to the module instances (parameter names are unchanged), before
    ``shard_model``. Under CP the recompute runs the ring again on every rank alike."""
    from torch.utils.checkpoint import checkpoint

    def wrap(module):
        forward = module.forward

        def checkpointed(*args, **kwargs):
            if not torch.is_grad_enabled():  # inference: nothing to save
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

        module.forward = checkpointed

    for block in model.vision.layers:
        wrap(block)
    for layer in model.text.layers:
        wrap(layer)
    return model


def shard_model(model: LongVITA, mesh=None, *, mp_policy=None) -> LongVITA:
    """FSDP2 over ``mesh`` (a 1-D DeviceMesh of every rank the parameters are sharded
    over: data and context parallel ranks together): each ViT block and decoder layer is
    its own unit, then the root. Order, as torchtitan applies it: activation
    checkpointing and compile would come first, then FSDP.

    FSDP2 AVERAGES gradients over the mesh, while ``packed_loss``'s shares need them
    summed: back-propagate ``loss * mesh.size()`` (``sum_gradients_loss``). (Setting
    FSDP's divide factor to 1 would say the same, but gloo lacks the PREMUL_SUM
    reduction it uses, and CPU tests run on gloo.)"""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in model.vision.layers:
        fully_shard(block, **kwargs)
    for layer in model.text.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def sum_gradients_loss(loss: torch.Tensor, mesh) -> torch.Tensor:
    """What to back-propagate through a model sharded by ``shard_model`` so that FSDP2's
    average of the ranks' gradients is their sum (report ``loss`` itself)."""
    return loss * mesh.size()
