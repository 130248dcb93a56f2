"""One rank's zigzag shard of one packed sequence: the layout, the rows it holds, and its
embeddings. The single place where inference (context-parallel prefill), training (the
packed loss) and evaluation (NIAH scoring) cut a sequence for context parallelism.

Every rank of the group holds the whole sequence's ids (cheap) and builds the same
``CPShard``; each then embeds only its own rows, encoding only the tiles whose context
tokens it holds (a tile cut by a chunk edge is encoded by both ranks), and runs the
decoder on them with ring attention (``attention()``). Padding rows (documents are padded
to a multiple of 2P) embed as zeros, carry no label and are never seen as keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from longvita.model import DecoderAttention, PackedAttention
from longvita.parallel.groups import rank_world
from longvita.parallel.plans import RingCausalAttention
from longvita.parallel.zigzag import ZigzagLayout, zigzag_layout

__all__ = ["CPShard"]


@dataclass(frozen=True)
class CPShard:
    """This rank's rows of a packed sequence split zigzag over ``group``.

    layout: the ``ZigzagLayout`` (the same on every rank). index: (total_local,) int64
    global row of every local row (padding rows point at row 0); valid: (total_local,)
    bool, False on padding rows. Both on the model's device."""

    layout: ZigzagLayout
    rank: int
    group: dist.ProcessGroup | None
    index: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, group: dist.ProcessGroup | None = None, device=None) -> "CPShard":
        """The shard of this rank of ``group`` (reads ``cu_seqlens`` on the host once).
        cu_seqlens: (B+1,) global document offsets; a sequence that is one document is
        ``[0, total]``."""
        rank, world = rank_world(group)
        device = torch.device(device) if device is not None else cu_seqlens.device
        layout = zigzag_layout(cu_seqlens, world, device)
        index, valid = layout.local_to_global(rank)
        return cls(layout, rank, group, index.to(device), valid.to(device))

    @classmethod
    def of_sequence(cls, total: int, group: dist.ProcessGroup | None = None, device=None) -> "CPShard":
        """The shard of one document of ``total`` tokens (a prompt, a NIAH cell)."""
        return cls.build(torch.tensor([0, total], dtype=torch.int32), group, device)

    @property
    def world(self) -> int:
        return self.layout.world_size

    def take(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """The local rows of a global (total, ...) tensor; padding rows hold ``fill``."""
        local = x.index_select(0, self.index.to(x.device))
        mask = self.valid.to(x.device).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(mask, local, torch.as_tensor(fill, dtype=x.dtype, device=x.device))

    def embed(self, model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
              tiles_per_chunk: int = 64, touch_vision: bool = False) -> tuple[torch.Tensor, int]:
        """(total_local, hidden) embeddings of this rank's rows (padding rows 0) and the
        number of tiles encoded (``LongVITA.embed_rows``)."""
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
        """Local position ids: of a global (total,) tensor, or the rows' global index (one
        document from 0)."""
        return self.index if position_ids is None else self.take(position_ids.to(self.index.device))

    def attention(self) -> DecoderAttention:
        """Causal attention of the local rows against every rank's (ring attention); alone,
        packed attention over the local layout (padding sits at each document's end, so a
        causal real row never sees it)."""
        if self.world == 1:
            return PackedAttention(self.layout.cu_seqlens_local, self.layout.max_seqlen_local)
        return RingCausalAttention(self.layout, self.group)

    def local_rows(self, global_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of ``global_rows`` (k,) this rank holds: (local rows, their positions in
        ``global_rows``), both int64 on the shard's device."""
        which = torch.full((self.layout.total,), -1, dtype=torch.long, device=self.index.device)
        which[global_rows.to(self.index.device)] = torch.arange(global_rows.numel(), device=self.index.device)
        k = torch.where(self.valid, which.index_select(0, self.index), -1)
        rows = (k >= 0).nonzero().squeeze(1)
        return rows, k.index_select(0, rows)

    def owner_of(self, row: int) -> int:
        """The rank holding global row ``row`` (each real row lives on exactly one rank)."""
        for r in range(self.world):
            index, valid = self.layout.local_to_global(r)
            if bool(((index == row) & valid).any()):
                return r
        raise ValueError(f"row {row} is outside the sequence of {self.layout.total} tokens")
