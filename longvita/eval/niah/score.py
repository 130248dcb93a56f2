"""Teacher-forced scoring of one NIAH cell (LongVA's protocol): one forward pass over the
whole cell, correct when the argmax at every answer position is the answer token; the
answer's mean log-likelihood beside it. No sampling, no KV cache.

The pass is context-parallel when ``group`` (a process group, or a ``parallel.CPGroups``
ring of Ulysses groups) has several ranks: every rank embeds only its shard (``parallel.CPShard``: token embeddings, media features from the cache placed
by ordinal), ring attention joins the shards, and only the rows that predict answer tokens
are projected (``LongVITA.logits`` with an index, on the rank holding each row); the
per-answer-token results are summed over the group.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longvita.eval.niah.cells import CellInputs
from longvita.parallel import CPShard

__all__ = ["score_cell"]


@torch.no_grad()
def score_cell(model, cell: CellInputs, media_features: Callable[[torch.Tensor], torch.Tensor] | None = None,
               group=None) -> dict:
    """Teacher-forced score of one cell.

    media_features(ordinals) -> (n, hidden): the embeddings of the given media tokens
    (ordinal k = the k-th media token of the sequence). Returns correct (every answer token
    is the argmax), logprob (mean log-likelihood of the answer tokens) and predicted (the
    argmax ids)."""
    device = next(model.parameters()).device
    ids, n_ans = cell.input_ids, cell.answer_positions.numel()
    shard = CPShard.of_sequence(ids.numel(), group, device)
    embeds = shard.embed_cached(model, ids, media_features)
    # row answer_positions[k] - 1 predicts answer token k
    rows, k = shard.local_rows(cell.answer_positions - 1)
    hidden = model(embeds, shard.positions(), shard.attention())
    logits = model.logits(hidden, rows).float()  # (rows, vocab): answer rows only
    targets = ids.to(device).index_select(0, cell.answer_positions.to(device)).index_select(0, k)
    hits = torch.zeros(n_ans, device=device)
    logp = torch.zeros(n_ans, device=device)
    pred = torch.zeros(n_ans, dtype=torch.long, device=device)
    if rows.numel():
        hits[k] = (logits.argmax(-1) == targets).float()
        logp[k] = F.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
        pred[k] = logits.argmax(-1)
    if shard.world > 1:
        for t in (hits, logp, pred):
            dist.all_reduce(t, group=shard.group)  # each answer token is held by exactly one rank
    return {"correct": bool(hits.sum().item() == n_ans), "logprob": logp.mean().item(),
            "predicted": pred.cpu().tolist()}
