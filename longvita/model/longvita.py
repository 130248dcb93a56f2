"""LongVITA: InternViT encoder -> pixel-shuffle projector -> Qwen2 decoder, in three steps
a caller composes:

    embeds = model.embed(input_ids, pixel_values)          # (tokens, hidden), media in their slots
    hidden = model(embeds, position_ids, attention)        # the decoder: final-norm hidden states
    logits = model.logits(hidden, index)                   # only the rows that need them
    loss = model.loss(hidden, labels)                      # fused with the LM head: no logits held

Input is packed from the start: 1-D ``input_ids`` of all tokens; the ``attention`` object
(``model/attention.py``) says which tokens see which (``PackedAttention(cu_seqlens)`` for
documents that must not attend to each other, ``CachedAttention`` through a KV cache, or a
context-parallel one passed in from ``longvita.parallel``) and which positions they have.
Projected tile embeddings replace the image-context tokens of ``input_ids`` in order.

The model holds no generation loop (``longvita.runtime.generate``) and no rule about
parallelism (``longvita.runtime.train.parallelize``): both act on it from outside.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from longvita.common import IGNORE_INDEX
from longvita.kernels import gather_logits, linear_cross_entropy
from longvita.model.attention import DecoderAttention, PackedAttention
from longvita.model.config import LongVITAConfig
from longvita.model.projector import Projector
from longvita.model.text import TextDecoder
from longvita.model.vision import VisionEncoder


class LongVITA(nn.Module):
    def __init__(self, config: LongVITAConfig):
        super().__init__()
        self.config = config.validate()
        self.vision = VisionEncoder(config.vision)
        self.projector = Projector(config.projector, config.vision.hidden_size, config.text.hidden_size)
        self.text = TextDecoder(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.text.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> "LongVITA":
        """Initialisation for training from scratch (checkpoints overwrite it): every
        weight matrix, embedding and position table N(0, std), biases 0 (Qwen2's and
        InternViT's ``initializer_range``), and the decoder's residual-branch outputs
        (``o_proj``, ``down_proj``) scaled by 1/sqrt(2 * layers) as in GPT-2, so the
        residual stream's scale does not grow with depth. PyTorch's defaults (N(0, 1)
        embeddings) leave a 4-layer decoder's stream ~25x dominated by the token
        embedding, which stalls the attention circuits copying needs (the demo recipe's
        retrieval task did not learn at all from them). Returns ``self``."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.vision.pos_embed, 0.0, std)
        nn.init.normal_(self.vision.cls_token, 0.0, std)
        scale = (2 * len(self.text.layers)) ** -0.5
        for layer in self.text.layers:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
        return self

    # ------------------------------------------------------------------ embeddings
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (tiles, C, S, S), normalised float or uint8 pixels ->
        (tiles * tokens_per_tile, text_hidden), all tiles at once."""
        features = self.vision(pixel_values)  # (tiles, patches, vision_hidden)
        return self.projector(features).flatten(0, 1)

    def media_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool (tokens,): which tokens are image/video-context slots."""
        if not self.config.image_token_ids:
            raise ValueError("config.image_token_ids is empty: bind a tokenizer (longvita.pipeline) or set the placeholder ids")
        ids = torch.tensor(self.config.image_token_ids, device=input_ids.device)
        return torch.isin(input_ids, ids)

    @staticmethod
    def place_media(embeds: torch.Tensor, slots: torch.Tensor, media_embeds: torch.Tensor) -> torch.Tensor:
        """Put precomputed media embeddings into token embeddings: row ``slots[i]`` of
        ``embeds`` (tokens, hidden) becomes ``media_embeds[i]``; returns a new tensor."""
        if slots.dim() != 1 or media_embeds.dim() != 2 or slots.shape[0] != media_embeds.shape[0]:
            raise ValueError(
                f"slots (n,) and media_embeds (n, hidden) must pair up, got {tuple(slots.shape)} and {tuple(media_embeds.shape)}"
            )
        return embeds.index_copy(0, slots.long(), media_embeds.to(embeds.dtype))

    def embed_rows(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        rows: torch.Tensor,
        *,
        tiles_per_chunk: int = 64,
        touch_vision: bool = False,
    ) -> tuple[torch.Tensor, int]:
        """Embeddings of the tokens ``input_ids[rows]`` with their media, encoding only the
        tiles whose context tokens are among ``rows`` (a tile cut by the edge of ``rows``
        is encoded whole), ``tiles_per_chunk`` tiles at a time, so vision activations stay
        bounded whatever the number of tiles. ``pixel_values`` may stay on the CPU: each
        chunk moves to the model's device when it is encoded.

        input_ids: (total,) the whole sequence; rows: (n,) int64 indices into it.
        touch_vision: when ``rows`` hold no media, still run the vision tower and projector
        on one tile (the first of ``pixel_values``, or a black one) with a zero weight, so
        the call takes part in whatever collectives a sharded vision tower runs (the rule
        of when that is needed lives with the parallelism: ``runtime.train.loss``).
        Returns ((n, hidden) embeddings, number of tiles encoded)."""
        if tiles_per_chunk < 1:
            raise ValueError(f"tiles_per_chunk must be >= 1, got {tiles_per_chunk}")
        embeds = self.text.embed_tokens(input_ids.index_select(0, rows))  # (n, hidden)
        tpt = self.config.tokens_per_tile
        local = torch.zeros(0, dtype=torch.long, device=rows.device)
        if pixel_values is not None:
            mask = self.media_mask(input_ids)
            n_slots = int(mask.sum())
            if n_slots != pixel_values.shape[0] * tpt:
                raise ValueError(
                    f"input_ids hold {n_slots} image-context tokens but pixel_values give "
                    f"{pixel_values.shape[0] * tpt} ({pixel_values.shape[0]} tiles x {tpt} tokens per tile)"
                )
            local = mask.index_select(0, rows).nonzero().squeeze(1)  # positions in `rows` that are media
        if local.numel() == 0:
            if not touch_vision:
                return embeds, 0
            v = self.config.vision
            tile = (pixel_values[:1] if pixel_values is not None and pixel_values.shape[0]
                    else torch.zeros(1, v.num_channels, v.image_size, v.image_size, dtype=torch.uint8))
            unused = self.image_embeddings(tile.to(embeds.device))  # gradient 0, but the modules ran
            return embeds + 0 * unused.sum().to(embeds.dtype), 1
        slot_of = torch.cumsum(mask, 0) - 1  # (total,) the slot number of every media token
        slots = slot_of.index_select(0, rows.index_select(0, local))
        tiles, which = torch.unique(slots // tpt, return_inverse=True)  # sorted tiles to encode
        dev = embeds.device
        out = torch.empty(tiles.numel() * tpt, embeds.shape[1], dtype=embeds.dtype, device=dev)
        for start in range(0, tiles.numel(), tiles_per_chunk):
            chunk = tiles[start : start + tiles_per_chunk]
            pixels = pixel_values.index_select(0, chunk.to(pixel_values.device)).to(dev)  # uint8 stays uint8
            out[start * tpt : (start + chunk.numel()) * tpt] = self.image_embeddings(pixels).to(embeds.dtype)
        media = out.index_select(0, which * tpt + slots % tpt)
        return self.place_media(embeds, local, media), int(tiles.numel())

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (tokens, hidden) of the whole of ``input_ids`` (1-D) with the
        tiles' projected embeddings in the image-context slots, in order (the tiles pass the
        vision tower in bounded chunks). For media encoded elsewhere (another rank, a chunk,
        a cache) use ``place_media``; for a subset of the rows, ``embed_rows``."""
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be 1-D (all packed tokens), got shape {tuple(input_ids.shape)}")
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.embed_rows(input_ids, pixel_values, rows)[0]

    # ------------------------------------------------------------------ decoder
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention: DecoderAttention | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (tokens, hidden) of ``inputs_embeds`` (tokens, hidden).

        attention: which tokens see which (default: all tokens one causal document).
        position_ids: (tokens,) int; default: what ``attention`` implies (restarting per
        packed document, continuing a cache); required for attentions over non-contiguous
        rows (a context-parallel shard)."""
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 2:
            got = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds).__name__
            raise ValueError(f"inputs_embeds must be a 2-D (tokens, hidden) tensor (model.embed(input_ids)), got {got}")
        n, device = inputs_embeds.shape[0], inputs_embeds.device
        if attention is None:
            attention = PackedAttention.one_document(n, device)
        if position_ids is None:
            position_ids = attention.positions(n, device)
            if position_ids is None:
                raise ValueError(f"position_ids are required with {type(attention).__name__}")
        if position_ids.shape != (n,):
            raise ValueError(f"position_ids must have shape ({n},), got {tuple(position_ids.shape)}")
        return self.text(inputs_embeds, position_ids, attention)

    # ------------------------------------------------------------------ LM head
    def logits(self, hidden: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (rows, vocab) of every row of ``hidden``, or only of ``index`` (int64 rows:
        gathered first, then projected, so nothing else reaches the head)."""
        if index is None:
            return self.lm_head(hidden)
        return gather_logits(hidden, self.lm_head.weight, index)

    def loss(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        *,
        ignore_index: int = IGNORE_INDEX,
        num_valid: torch.Tensor | int | None = None,
        group=None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy of ``hidden`` against ``labels`` (aligned with the
        rows: row i's label is the token it predicts, ``ignore_index`` where none), fused with
        the LM head so that logits never exist. ``num_valid`` or ``group`` make it a mean over
        a global count; ``label_smoothing`` and ``z_loss`` as ``linear_cross_entropy`` defines
        them (``longvita.kernels.linear_cross_entropy``)."""
        return linear_cross_entropy(
            hidden, self.lm_head.weight, labels, ignore_index=ignore_index, num_valid=num_valid, group=group,
            label_smoothing=label_smoothing, z_loss=z_loss,
        )

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> "LongVITA":
        """Load a Hugging Face-style folder: transformers' InternVL layout, Long-VITA's own
        released layout, or InternVL's original layout (see ``checkpoint.py``)."""
        from longvita.model.checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path: str, max_shard_bytes: int | None = None, tokenizer=None) -> None:
        """Write ``config.json`` + safetensors in transformers' InternVL layout, and
        ``tokenizer.json`` when a ``tokenizers.Tokenizer`` is given, so that the folder
        works with ``from_pretrained`` and ``longvita generate --model``."""
        from longvita.model.checkpoint import MAX_SHARD_BYTES, save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes or MAX_SHARD_BYTES, tokenizer=tokenizer)
