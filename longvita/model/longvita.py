"""LongVITA: InternViT encoder -> pixel-shuffle projector -> Qwen2 decoder.

Input is packed from the start: 1-D ``input_ids`` of all tokens, ``cu_seqlens`` (int32)
separating samples that must not attend to each other, ``position_ids`` restarting per
sample. Projected tile embeddings replace the image-context tokens of ``input_ids`` in
order. Only the rows in ``logits_index`` reach the LM head.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn as nn

from longvita.kernels import gather_logits, linear_cross_entropy
from longvita.model.config import LongVITAConfig
from longvita.model.projector import Projector
from longvita.model.sampling import Sampling
from longvita.model.attention import CachedAttention, DecoderAttention, KVCache, PackedAttention
from longvita.model.text import TextDecoder
from longvita.model.vision import VisionEncoder


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position ids restarting at 0 in every packed sample (no host sync)."""
    starts = cu_seqlens[:-1].long()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    offsets = torch.repeat_interleave(starts, lengths, output_size=int(total))
    return torch.arange(total, device=cu_seqlens.device) - offsets


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
        """pixel_values (tiles, 3, S, S), normalised float or uint8 pixels ->
        (tiles * tokens_per_tile, text_hidden), all tiles at once."""
        features = self.vision(pixel_values)  # (tiles, patches, vision_hidden)
        return self.projector(features).flatten(0, 1)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (tokens, hidden) with the tiles' projected embeddings in the
        image-context slots, in order (the tiles pass the vision tower in bounded chunks).
        Every slot must have its tile: for media encoded elsewhere (another rank, a chunk,
        a cache) use ``place_media`` and ``inputs_embeds=``."""
        if pixel_values is None:
            return self.text.embed_tokens(input_ids)  # (tokens, hidden)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.embed_rows(input_ids, pixel_values, rows)[0]

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

    # ------------------------------------------------------------------ forward
    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: KVCache | None = None,
        attention: DecoderAttention | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (tokens, hidden) of the packed input.

        Give ``input_ids`` (and ``pixel_values``), or ``inputs_embeds`` (tokens, hidden)
        already embedded. ``rows`` (int64 indices into ``input_ids``) computes only those
        tokens, encoding only the tiles they need (``embed_rows``): a context-parallel
        rank's shard, with an ``attention`` that sees the other ranks' tokens. Attention is causal within the documents of ``cu_seqlens``
        (default: one document), or through ``cache``, or whatever ``attention`` does (a
        ``DecoderAttention`` built outside, e.g. context-parallel by ``longvita.dist``:
        then ``position_ids`` are required)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            if pixel_values is not None:
                raise ValueError("pixel_values cannot be combined with inputs_embeds (place media with place_media)")
            if inputs_embeds.dim() != 2:
                raise ValueError(f"inputs_embeds must be 2-D (tokens, hidden), got shape {tuple(inputs_embeds.shape)}")
            total, device = inputs_embeds.shape[0], inputs_embeds.device
        else:
            if input_ids.dim() != 1:
                raise ValueError(f"input_ids must be 1-D (all packed tokens), got shape {tuple(input_ids.shape)}")
            total, device = input_ids.shape[0], input_ids.device
            if rows is not None:
                if attention is None:
                    raise ValueError("rows needs an attention that sees the tokens outside them (e.g. ring attention)")
                total = rows.shape[0]
        if sum(x is not None for x in (cu_seqlens, cache, attention)) > 1:
            raise ValueError("give at most one of cu_seqlens, cache and attention")
        if attention is not None:
            if position_ids is None:
                raise ValueError("position_ids are required with a custom attention")
        elif cache is not None:
            attention = CachedAttention(cache, total, device)  # checks the capacity
            if position_ids is None:
                position_ids = torch.arange(cache.length, cache.length + total, device=device)
        else:
            if cu_seqlens is None:
                cu_seqlens = torch.tensor([0, total], dtype=torch.int32, device=device)
                max_seqlen = total
            elif cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
                raise ValueError(f"cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # one host sync; pass it to avoid
            if position_ids is None:
                position_ids = positions_from_cu_seqlens(cu_seqlens, total)
            attention = PackedAttention(cu_seqlens, max_seqlen)
        if inputs_embeds is None:
            if rows is None:
                inputs_embeds = self.embed(input_ids, pixel_values)
            else:
                # a forward that will be differentiated runs the vision tower on every rank
                # (see embed_rows): a sharded model's gradient collectives must match
                min_tiles = 1 if torch.is_grad_enabled() else 0
                inputs_embeds = self.embed_rows(input_ids, pixel_values, rows, min_tiles=min_tiles)[0]
        return self.text(inputs_embeds, position_ids, attention)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        logits_index: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention: DecoderAttention | None = None,
        rows: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        ignore_index: int = -100,
        num_valid: torch.Tensor | int | None = None,
        loss_group=None,
    ) -> torch.Tensor:
        """Logits (rows, vocab): all rows, or only ``logits_index`` (gather, then project).
        With ``labels`` (aligned with the rows: row i's label is the token it predicts,
        ``ignore_index`` where none), the mean cross-entropy instead, fused with the LM head
        so logits never exist; ``num_valid`` or ``loss_group`` make it a mean over a global
        count (``linear_cross_entropy``). Inputs as for ``hidden_states``.

        The loss is computed here, in ``forward``, so that wrappers that hook ``forward``
        (FSDP2's ``fully_shard`` gathers the sharded LM head there) see it."""
        hidden = self.hidden_states(
            input_ids, pixel_values, inputs_embeds=inputs_embeds, position_ids=position_ids,
            cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, cache=cache, attention=attention, rows=rows,
        )
        if labels is not None:
            if logits_index is not None:
                raise ValueError("labels and logits_index cannot be combined")
            return linear_cross_entropy(
                hidden, self.lm_head.weight, labels, ignore_index=ignore_index, num_valid=num_valid, group=loss_group
            )
        if logits_index is None:
            return self.lm_head(hidden)
        return gather_logits(hidden, self.lm_head.weight, logits_index)

    def loss(
        self,
        input_ids: torch.Tensor | None,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy (``forward`` with ``labels``; logits are never
        materialised). ``labels`` are aligned with ``input_ids``: row i's label is the token
        it predicts, -100 where ignored."""
        return self(input_ids, pixel_values, labels=labels, **kwargs)

    def check_generation(self, input_ids: torch.Tensor, max_new_tokens: int) -> None:
        """Raise ValueError, before any work, for a prompt that is not a non-empty 1-D
        tensor, a negative ``max_new_tokens``, or a sequence that would pass the model's
        ``max_position_embeddings`` (every generation path checks this)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if input_ids.dim() != 1 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty 1-D prompt, got shape {tuple(input_ids.shape)}")
        tokens, limit = input_ids.shape[0] + max_new_tokens, self.config.text.max_position_embeddings
        if tokens > limit:
            raise ValueError(
                f"the sequence needs {tokens} positions but the model's max_position_embeddings is {limit}"
            )

    # ------------------------------------------------------------------ generation
    def embed_rows(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        rows: torch.Tensor,
        *,
        tiles_per_chunk: int = 64,
        min_tiles: int = 0,
    ) -> tuple[torch.Tensor, int]:
        """Embeddings of the tokens ``input_ids[rows]`` with their media, encoding only the
        tiles whose context tokens are among ``rows`` (a tile cut by the edge of ``rows``
        is encoded whole), ``tiles_per_chunk`` tiles at a time, so vision activations stay
        bounded whatever the number of tiles. ``pixel_values`` may stay on the CPU: each
        chunk moves to the model's device when it is encoded.

        input_ids: (total,) the whole prompt; rows: (n,) int64 indices into it.
        min_tiles=1: when ``rows`` hold no media, still run the vision tower on one tile
        with a zero weight, so that every rank of a sharded (FSDP) model takes part in the
        vision tower's gradient collectives.
        Returns ((n, hidden) embeddings, number of tiles encoded)."""
        if tiles_per_chunk < 1:
            raise ValueError(f"tiles_per_chunk must be >= 1, got {tiles_per_chunk}")
        embeds = self.text.embed_tokens(input_ids.index_select(0, rows))  # (n, hidden)
        if pixel_values is None:
            return embeds, 0
        tpt = self.config.tokens_per_tile
        mask = self.media_mask(input_ids)
        slot_of = torch.cumsum(mask, 0) - 1  # (total,) the slot number of every media token
        n_slots = int(mask.sum())
        if n_slots != pixel_values.shape[0] * tpt:
            raise ValueError(
                f"input_ids hold {n_slots} image-context tokens but pixel_values give "
                f"{pixel_values.shape[0] * tpt} ({pixel_values.shape[0]} tiles x {tpt} tokens per tile)"
            )
        local = mask.index_select(0, rows).nonzero().squeeze(1)  # positions in `rows` that are media
        if local.numel() == 0:
            if min_tiles < 1:
                return embeds, 0
            unused = self.image_embeddings(pixel_values[:1].to(embeds.device))  # gradient 0, but present
            return embeds + 0 * unused.sum().to(embeds.dtype), 1
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

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        eos_token_id: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        prefill_chunk: int | None = None,
        prefill_progress: Callable[[float], None] | None = None,
    ) -> Iterator[int]:
        """Yield new token ids of one sequence: prefill once, then KV-cached decode.

        Only the last position reaches the LM head at every step. ``temperature=0`` is
        greedy; otherwise ``top_k``/``top_p`` filter and ``generator`` draws.
        ``prefill_chunk=N`` runs the prompt through the cache N tokens at a time (media
        included), so activation memory is bounded by N, not by the prompt;
        ``prefill_progress(fraction)`` is then called after every chunk (a progress bar).
        """
        self.check_generation(input_ids, max_new_tokens)
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        sample = Sampling(temperature, top_k, top_p)
        if max_new_tokens == 0:
            return  # nothing to generate: no prefill either
        total, device = input_ids.shape[0], input_ids.device
        dtype = self.text.embed_tokens.weight.dtype
        cache = KVCache.empty(self.config.text, total + max_new_tokens, device, dtype)
        zero = torch.zeros(1, dtype=torch.long, device=device)
        if prefill_chunk is None:
            logits = self(input_ids, pixel_values, cache=cache, logits_index=torch.tensor([total - 1], device=device))
        else:
            for start in range(0, total, prefill_chunk):
                rows = torch.arange(start, min(start + prefill_chunk, total), device=device)
                embeds, _ = self.embed_rows(input_ids, pixel_values, rows)
                hidden = self.hidden_states(inputs_embeds=embeds, cache=cache)
                if prefill_progress is not None:
                    prefill_progress(int(rows[-1]) / (total - 1) if total > 1 else 1.0)
            logits = gather_logits(hidden, self.lm_head.weight, torch.tensor([hidden.shape[0] - 1], device=device))
        for step in range(max_new_tokens):
            token = sample(logits[-1], generator)
            yield token
            # the last token needs no forward of its own: stop before computing its logits
            if step == max_new_tokens - 1 or (eos_token_id is not None and token == eos_token_id):
                return
            logits = self(torch.tensor([token], device=device), cache=cache, logits_index=zero)

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
