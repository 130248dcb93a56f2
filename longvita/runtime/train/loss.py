"""The loss of one packed batch with exact gradients under context and data parallelism.

Every rank of a context-parallel (CP) group holds the same packed batch (ids, labels
shifted within each sample, tiles, ``cu_seqlens``); each computes only its zigzag shard
of the tokens (``parallel.CPShard``: chunks r and 2P-1-r of every document), encoding
only the tiles whose context tokens fall in that shard, with ring attention in every
decoder layer.

Exactness. Each rank returns ``sum of its valid token losses / N``, with N the count of
valid labels over the whole CP group's batch (and over every data-parallel group's batch
when ``dp_group`` is given): the sum of the returned values over all ranks is the global
mean, and the sum of every rank's gradients is the gradient of the global mean. So the
parameter gradients must be SUMMED over the ranks, not averaged: ``all_reduce_gradients``
for plain replicas, or FSDP2 (``parallelize.shard_model``) with ``sum_gradients_loss``.

``PackedLoss`` is the whole training forward as one module (embed -> decoder -> fused
loss), so that FSDP2, which gathers parameters in a module's ``forward``, sees every use
of the model's unsharded parameters (the embeddings, the projector, the LM head) inside
one forward. The model itself stays a plain ``LongVITA``.

The vision rule. A module whose parameters are sharded (FSDP2), or whose gradients are
all-reduced, must run on every rank of the reduction whenever it runs on one: its
all-gathers and gradient reductions are collectives. So when ``touch_vision`` is set (the
trainer sets it when any rank of the step has media), a rank without media in its rows
still runs the vision tower and projector, on one tile with weight 0 (``embed_rows``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from longvita.common import IGNORE_INDEX
from longvita.model import LongVITA, PackedAttention, positions_from_cu_seqlens
from longvita.parallel import CPGroups, CPShard, rank_world

__all__ = ["PackedLoss", "all_reduce_gradients", "packed_loss"]


class PackedLoss(nn.Module):
    """``forward(...)`` = this rank's share of the mean cross-entropy of a packed batch (see
    ``packed_loss`` for the arguments). Holds the model as ``self.model``, so its state dict
    keys are the model's with a ``model.`` prefix."""

    def __init__(self, model: LongVITA):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cp_group: dist.ProcessGroup | CPGroups | None = None,
        dp_group: dist.ProcessGroup | None = None,
        touch_vision: bool = False,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
    ) -> torch.Tensor:
        model = self.model
        groups = CPGroups.of(cp_group)
        options = {"label_smoothing": label_smoothing, "z_loss": z_loss}
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must match input_ids, got {tuple(labels.shape)} and {tuple(input_ids.shape)}")
        total = input_ids.shape[0]
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens, total)
        # the global count of valid labels: the same on every CP rank (they hold one batch);
        # summed over the DP ranks' batches (a count, so no gradient flows through it)
        num_valid = (labels != IGNORE_INDEX).sum()
        if dp_group is not None and rank_world(dp_group)[1] > 1:
            dist.all_reduce(num_valid, group=dp_group)
        if rank_world(groups.group)[1] == 1:
            rows = torch.arange(total, device=input_ids.device)
            embeds = model.embed_rows(input_ids, pixel_values, rows, touch_vision=touch_vision)[0]
            hidden = model(embeds, position_ids, PackedAttention(cu_seqlens, max_seqlen))
            return model.loss(hidden, labels, num_valid=num_valid, **options)
        shard = CPShard.build(cu_seqlens, groups, input_ids.device)
        embeds, _ = shard.embed(model, input_ids, pixel_values, touch_vision=touch_vision)
        hidden = model(embeds, shard.positions(position_ids), shard.attention())
        return model.loss(hidden, shard.take(labels, IGNORE_INDEX), num_valid=num_valid, **options)


def packed_loss(
    model: LongVITA | PackedLoss,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    cp_group: dist.ProcessGroup | CPGroups | None = None,
    dp_group: dist.ProcessGroup | None = None,
    touch_vision: bool | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """This rank's share of the mean cross-entropy of a packed batch (see the module
    docstring: the shares of all ranks add up to the global mean).

    model: a ``LongVITA``, or the ``PackedLoss`` that wraps it (what FSDP2 shards).
    input_ids, labels: (T,) the whole pack, the same on every rank of ``cp_group``; labels
        already shifted within each sample (IGNORE_INDEX where none).
    cu_seqlens: (B+1,) int32 documents (one per sample when positions reset, ``[0, T]``
        when the pack is one document). position_ids default to restarting per document;
        max_seqlen (the longest document, an int) saves a host sync when given.
    cp_group: the context-parallel group: a ``parallel.CPGroups`` (a ring of Ulysses groups),
        a process group (a plain ring over it), or None (the default group when initialised,
        else one process). dp_group: the data-parallel group whose batches make the global mean.
    touch_vision: run the vision tower even on a rank with no media (the vision rule);
        default: whenever the pack has media and the CP group has several ranks.
    label_smoothing, z_loss: the loss's options (``LongVITA.loss``).
    """
    if touch_vision is None:
        touch_vision = pixel_values is not None and rank_world(CPGroups.of(cp_group).group)[1] > 1
    module = model if isinstance(model, PackedLoss) else PackedLoss(model)
    return module(input_ids, labels, pixel_values, cu_seqlens=cu_seqlens, position_ids=position_ids,
                  max_seqlen=max_seqlen, cp_group=cp_group, dp_group=dp_group, touch_vision=touch_vision,
                  label_smoothing=label_smoothing, z_loss=z_loss)


def all_reduce_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum every parameter gradient over ``group`` (replicated parameters under CP)."""
    if rank_world(group)[1] == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
