"""One rank's shard of one packed sequence for context parallelism: the layout, the rows it
holds, and its embeddings. The single place where inference (context-parallel prefill),
training (the packed loss) and evaluation (NIAH scoring) cut a sequence.

Every rank of the group holds the whole sequence's ids (cheap) and builds the same
layout; each then embeds only its own rows, encoding only the tiles whose context tokens
it holds (a tile cut by a shard edge is encoded by every rank that holds part of it), and
runs the decoder on them with the attention of ``attention()``. The rows: the sequence is
cut zigzag over the R ring positions (documents padded to a multiple of 2R), and a ring
position's rows are cut into U contiguous parts for its Ulysses group (``parallel.ulysses``;
U = 1 for the plain ring). Padding rows embed as zeros, carry no label and are never seen
as keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from longvita.model import DecoderAttention, PackedAttention
from longvita.parallel.groups import rank_world
from longvita.parallel.mesh import CPGroups
from longvita.parallel.plans import RingCausalAttention
from longvita.parallel.ulysses import UlyssesRingAttention, ulysses_rows
from longvita.parallel.zigzag import ZigzagLayout, zigzag_layout

__all__ = ["CPShard"]


def _rows_of(layout: ZigzagLayout, ring_rank: int, ulysses: int, ulysses_rank: int):
    """(global row, real?) of every row the rank (ring position, place in its Ulysses group) holds."""
    index, valid = layout.local_to_global(ring_rank)
    if ulysses == 1:
        return index, valid
    n = ulysses_rows(index.numel(), ulysses)
    pad = n * ulysses - index.numel()
    index = torch.cat([index, index.new_zeros(pad)])
    valid = torch.cat([valid, valid.new_zeros(pad)])
    return index[ulysses_rank * n:(ulysses_rank + 1) * n], valid[ulysses_rank * n:(ulysses_rank + 1) * n]


@dataclass(frozen=True)
class CPShard:
    """This rank's rows of a packed sequence split over a context-parallel group.

    layout: the ``ZigzagLayout`` over the ring positions (the same on every rank). groups:
    the ``CPGroups``. index: (rows,) int64 global row of every local row (padding rows point
    at row 0); valid: (rows,) bool, False on padding rows. Both on the model's device."""

    layout: ZigzagLayout
    groups: CPGroups
    ring_rank: int
    ulysses_rank: int
    index: torch.Tensor
    valid: torch.Tensor
    offset: int = 0

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, cp=None, device=None, offset: int = 0) -> "CPShard":
        """The shard of this rank (reads ``cu_seqlens`` on the host once). cu_seqlens: (B+1,)
        document offsets (a sequence that is one document is ``[0, total]``). cp: a
        ``CPGroups``, a process group (a plain ring over it), or None (the default group, or
        one process). offset: where row 0 of this sequence sits in a longer one (a chunk of a
        prompt): ``index`` then holds rows of the longer sequence."""
        groups = CPGroups.of(cp)
        ring_rank, ring = rank_world(groups.ring)
        device = torch.device(device) if device is not None else cu_seqlens.device
        layout = zigzag_layout(cu_seqlens, ring, device)
        u_rank = groups.ulysses_rank
        index, valid = _rows_of(layout, ring_rank, groups.ulysses_degree, u_rank)
        return cls(layout, groups, ring_rank, u_rank, (index + offset).to(device), valid.to(device), offset)

    @classmethod
    def of_sequence(cls, total: int, cp=None, device=None, offset: int = 0) -> "CPShard":
        """The shard of one document of ``total`` tokens (a prompt, a NIAH cell, or the chunk
        of a prompt starting at row ``offset``)."""
        return cls.build(torch.tensor([0, total], dtype=torch.int32), cp, device, offset)

    @property
    def world(self) -> int:
        """Ranks of the context-parallel group."""
        return self.layout.world_size * self.groups.ulysses_degree

    @property
    def group(self):
        return self.groups.group

    def take(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """The local rows of a global (total, ...) tensor; padding rows hold ``fill``."""
        local = x.index_select(0, self.index.to(x.device))
        mask = self.valid.to(x.device).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(mask, local, torch.as_tensor(fill, dtype=x.dtype, device=x.device))

    def embed(self, model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
              tiles_per_chunk: int = 64, touch_vision: bool = False) -> tuple[torch.Tensor, int]:
        """(rows, hidden) embeddings of this rank's rows (padding rows 0) and the number of
        tiles encoded (``LongVITA.embed_rows``)."""
        embeds, tiles = model.embed_rows(input_ids.to(self.index.device), pixel_values, self.index,
                                         tiles_per_chunk=tiles_per_chunk, touch_vision=touch_vision)
        return embeds * self.valid[:, None].to(embeds.dtype), tiles

    def embed_cached(self, model, input_ids: torch.Tensor,
                     media_features: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        """Embeddings of this rank's rows with media taken from elsewhere (a feature cache):
        ``media_features(ordinals)`` -> (n, hidden) for the k-th media tokens of the sequence."""
        device = self.index.device
        ids = input_ids.to(device)
        embeds = model.text.embed_tokens(ids.index_select(0, self.index))
        embeds = embeds * self.valid[:, None].to(embeds.dtype)  # padding rows: zeros
        if not model.config.image_token_ids:
            return embeds
        media = model.media_mask(ids)
        if not bool(media.any()):
            return embeds
        if media_features is None:
            raise ValueError("the sequence has media tokens but no media_features was given")
        ordinal = media.long().cumsum(0) - 1
        slots = (media.index_select(0, self.index) & self.valid).nonzero().squeeze(1)
        if slots.numel() == 0:
            return embeds
        feats = media_features(ordinal.index_select(0, self.index.index_select(0, slots)).cpu())
        return model.place_media(embeds, slots, feats.to(device))

    def positions(self, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Local position ids: of a global (total,) tensor, or the rows' index (one document)."""
        if position_ids is None:
            return self.index
        return self.take(position_ids.to(self.index.device))

    def attention(self, with_lse: bool = False) -> DecoderAttention:
        """Causal attention of the local rows against every rank's: ring attention, with
        Ulysses all-to-alls inside each group when U > 1; alone, packed attention over the
        local layout (padding sits at each document's end, so a causal real row never sees
        it). ``with_lse``: one that also offers ``attend_with_lse`` (the ring's, even alone)."""
        if self.groups.ulysses_degree > 1:
            return UlyssesRingAttention(self.layout, self.groups)
        if self.world == 1 and not with_lse:
            return PackedAttention(self.layout.cu_seqlens_local, self.layout.max_seqlen_local)
        return RingCausalAttention(self.layout, self.groups.ring)

    def local_rows(self, global_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of ``global_rows`` (k,) this rank holds: (local rows, their positions in
        ``global_rows``), both int64 on the shard's device."""
        which = torch.full((self.layout.total,), -1, dtype=torch.long, device=self.index.device)
        which[global_rows.to(self.index.device) - self.offset] = torch.arange(global_rows.numel(), device=self.index.device)
        k = torch.where(self.valid, which.index_select(0, self.index - self.offset), -1)
        rows = (k >= 0).nonzero().squeeze(1)
        return rows, k.index_select(0, rows)

    def real_rows_of(self, cp_rank: int) -> int:
        """How many real (non-padding) rows CP rank ``cp_rank`` holds (the same answer on
        every rank: the layout is shared)."""
        u = self.groups.ulysses_degree
        return int(_rows_of(self.layout, cp_rank // u, u, cp_rank % u)[1].sum())

    def owner_of(self, row: int) -> int:
        """The CP rank (in ``groups.group``) holding global row ``row`` (each real row lives
        on exactly one rank)."""
        u = self.groups.ulysses_degree
        for c in range(self.world):
            index, valid = _rows_of(self.layout, c // u, u, c % u)
            if bool(((index + self.offset == row) & valid).any()):
                return c
        raise ValueError(f"row {row} is outside the sequence of rows [{self.offset}, {self.offset + self.layout.total})")
