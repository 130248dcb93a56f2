"""Context parallelism for transformers' decoders: ``context_parallel(model, group)`` once,
``shard_batch(batch, group)`` per batch.

Every rank of ``group`` holds the same batch. ``shard_batch`` packs its real tokens into one
sequence of documents (the documents the attention function would see: ``cu_seq_lens_q``,
``position_ids`` that restart, or one per row of a padded batch), cuts it zigzag with
``parallel.CPShard`` (every document padded to a multiple of 2P and cut in 2P chunks; rank
r keeps chunks r and 2P-1-r) and returns this rank's rows as a batch of one row:

    input_ids / inputs_embeds  (1, T_local)  this rank's tokens (padding rows: token 0 / zeros)
    position_ids               (1, T_local)  their GLOBAL positions (RoPE as in one process)
    labels, shift_labels       (1, T_local)  the labels, and the target of every row -- shifted
                                             per row BEFORE the cut, since a row's successor
                                             may live on another rank (IGNORE_INDEX on padding)
    num_items_in_batch         ()            valid targets of the WHOLE batch
    use_cache                  False
    longvita_cp                CPShard       the layout; the attention function runs ring
                                             attention over its group when it sees it

transformers passes the unknown ``longvita_cp`` down to every attention call, and both its
own loss and longvita's fused loss honour ``shift_labels`` and ``num_items_in_batch``, so
each rank's ``loss`` is ``sum of its valid token losses / valid targets of the whole batch``:
its share of the global mean. The shares add up to the global mean and the gradients must
be SUMMED over the ranks: ``longvita.runtime.train.loss.all_reduce_gradients(model, group)``
for replicas, or, since DDP and FSDP2 AVERAGE, back-propagate ``loss * ranks`` there (the
ranks they average over; ``runtime.train.parallelize.sum_gradients_loss``). With data
parallelism beside CP, put the count of every DP group's batch in ``num_items_in_batch``
before sharding (it is kept as given).

Memory: each rank holds the whole batch's ids (cheap) and 1/P of every activation; the
ring moves one K/V block at a time.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from longvita.common import IGNORE_INDEX
from longvita.integrations.transformers.attention import CP_KWARG
from longvita.integrations.transformers.patch import apply_longvita, install_forward, model_kind
from longvita.parallel import CPShard, rank_world

__all__ = ["context_parallel", "shard_batch"]

# batch keys shard_batch consumes (its output says the same in other words)
_CONSUMED = ("attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx",
             "position_ids", "labels", "shift_labels", "input_ids", "inputs_embeds", "use_cache")


def context_parallel(model, group=None, *, fused_loss: bool = True):
    """Make ``model`` run context-parallel over ``group`` (in place; returns it).

    ``apply_longvita(model, attention=True, fused_loss=fused_loss)``, plus checks in the
    forward: with more than one rank, a batch with labels that ``shard_batch`` did not shard
    is refused (every rank would add the whole batch's loss), and so is a batch sharded over
    another group. ``group=None``: the default group (one process without torch.distributed).
    A forward without ``longvita_cp`` (evaluation on one rank, ``generate``) runs as usual.
    """
    model_kind(model, "context_parallel")
    _, world = rank_world(group)
    apply_longvita(model, attention=True, fused_loss=fused_loss)
    options = install_forward(model)
    options.cp, options.cp_group, options.cp_world = True, group, world
    return model


def _per_token(x: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
    """(B, T, ...) from (B, T, ...) or (1, T, ...) / (T,)."""
    if x.dim() == 1:
        x = x[None]
    return x.expand(batch, tokens, *x.shape[2:])


def shard_batch(batch: Mapping, group=None, *, ignore_index: int = IGNORE_INDEX) -> dict:
    """This rank's zigzag shard of ``batch`` (see the module docstring for what comes back).

    Args:
        batch: a transformers batch: ``input_ids`` (B, T) or ``inputs_embeds`` (B, T, H);
            optionally ``labels``, ``shift_labels``, ``position_ids`` (default 0..T-1 per row,
            as the model's own), ``attention_mask`` (padding), ``cu_seq_lens_q/k`` and
            ``max_length_q/k`` (``DataCollatorWithFlattening``), ``num_items_in_batch``
            (kept as given). Other entries (e.g. ``pixel_values``) pass through unchanged;
            another per-token tensor is refused, naming its key.
        group: the context-parallel group (None: the default group, or one process).
        ignore_index: the label that counts for nothing.

    Labels at padding positions must be ``ignore_index`` (padding leaves the batch).
    Collective only through ``CPShard.build`` (none: every rank computes the same layout).
    """
    rank_world(group)  # a group without torch.distributed: ValueError now, not after the work
    ids, embeds = batch.get("input_ids"), batch.get("inputs_embeds")
    first = ids if ids is not None else embeds
    if not isinstance(first, torch.Tensor) or first.dim() < (2 if ids is not None else 3):
        raise ValueError("batch must hold input_ids (batch, tokens) or inputs_embeds (batch, tokens, hidden)")
    b, t = first.shape[:2]
    device = first.device
    for key, value in batch.items():
        if key not in _CONSUMED and isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (b, t):
            raise ValueError(f"shard_batch does not know how to cut batch[{key!r}], a per-token tensor of shape "
                             f"{tuple(value.shape)}")

    mask = batch.get("attention_mask")
    real = torch.ones((b, t), dtype=torch.bool, device=device) if mask is None else mask.to(device, torch.bool)
    position_ids = batch.get("position_ids")
    position_ids = (torch.arange(t, device=device) if position_ids is None else position_ids.to(device))
    position_ids = _per_token(position_ids, b, t)

    # starts: (B, T) True where a document opens (the attention function's rules)
    starts = torch.zeros((b, t), dtype=torch.bool, device=device)
    starts[:, 0] = True
    cu = batch.get("cu_seq_lens_q")
    if cu is not None:
        cu_k = batch.get("cu_seq_lens_k")
        if cu_k is not None and not torch.equal(cu_k.cpu(), cu.cpu()):
            raise ValueError("cu_seq_lens_q and cu_seq_lens_k must be equal (self-attention over one packed batch)")
        if mask is not None and not bool(real.all()):
            raise ValueError("pass cu_seq_lens_q/k or a padding attention_mask, not both")
        starts.view(-1)[cu[:-1].to(device=device, dtype=torch.long).clamp(max=b * t - 1)] = True
    elif mask is None:
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    # (with a padding mask: one document per row, its real tokens)

    labels, shift_labels = batch.get("labels"), batch.get("shift_labels")
    if shift_labels is None and labels is not None:  # per row, as transformers' loss shifts
        shift_labels = F.pad(_per_token(labels, b, t)[:, 1:], (0, 1), value=ignore_index)
    if shift_labels is not None:
        shift_labels = _per_token(shift_labels.to(device), b, t)
        if mask is not None and bool((shift_labels[~real] != ignore_index).any()):
            raise ValueError(f"labels at padding positions must be ignore_index ({ignore_index}): padding leaves the batch")

    keep = real.flatten().nonzero().squeeze(1)  # (N,) real tokens of the flattened (B*T) grid
    row = keep // t
    opens = starts.flatten()[keep]
    opens[1:] |= row[1:] != row[:-1]  # a document never spans two rows
    if keep.numel():
        opens[0] = True
    firsts = opens.nonzero().squeeze(1)
    cu_seqlens = torch.cat([firsts, firsts.new_full((1,), keep.numel())]).to(torch.int32)
    shard = CPShard.build(cu_seqlens, group, device)

    def cut(x: torch.Tensor, fill) -> torch.Tensor:  # (B, T, ...) -> (1, T_local, ...)
        x = x.reshape(b * t, *x.shape[2:]).index_select(0, keep)
        return shard.take(x, fill)[None]

    out = {k: v for k, v in batch.items() if k not in _CONSUMED}
    if ids is not None:
        out["input_ids"] = cut(_per_token(ids.to(device), b, t), 0)
    if embeds is not None:
        out["inputs_embeds"] = cut(embeds.to(device), 0)
    out["position_ids"] = cut(position_ids, 0)
    if shift_labels is not None:
        out["labels"] = cut(_per_token(labels.to(device), b, t), ignore_index) if labels is not None else None
        out["shift_labels"] = cut(shift_labels, ignore_index)
        if out["labels"] is None:
            out["labels"] = out["shift_labels"]  # the models compute a loss only when labels are given
        if out.get("num_items_in_batch") is None:
            out["num_items_in_batch"] = (shift_labels.reshape(-1).index_select(0, keep) != ignore_index).sum()
    out["use_cache"] = False
    out[CP_KWARG] = shard
    return out
