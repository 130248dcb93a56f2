"""LongVITA: InternViT encoder -> pixel-shuffle projector -> Qwen2 decoder.

Input is packed from the start: 1-D ``input_ids`` of all tokens, ``cu_seqlens`` (int32)
separating samples that must not attend to each other, ``position_ids`` restarting per
sample. Projected tile embeddings replace the image-context tokens of ``input_ids`` in
order. Only the rows in ``logits_index`` reach the LM head.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn

from longvita.kernels import gather_logits, linear_cross_entropy
from longvita.model.config import LongVITAConfig
from longvita.model.projector import Projector
from longvita.model.text import KVCache, TextDecoder
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

    # ------------------------------------------------------------------ embeddings
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (tiles, 3, S, S) -> (tiles * tokens_per_tile, text_hidden)."""
        features = self.vision(pixel_values)  # (tiles, patches, vision_hidden)
        return self.projector(features).flatten(0, 1)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.text.embed_tokens(input_ids)  # (tokens, hidden)
        if pixel_values is None:
            return embeds
        if not self.config.image_token_ids:
            raise ValueError("pixel_values given but config.image_token_ids is empty: set the placeholder token ids")
        ids = torch.tensor(self.config.image_token_ids, device=input_ids.device)
        mask = torch.isin(input_ids, ids)
        image_embeds = self.image_embeddings(pixel_values).to(embeds.dtype)
        n_slots = int(mask.sum())
        if n_slots != image_embeds.shape[0]:
            raise ValueError(
                f"input_ids hold {n_slots} image-context tokens but pixel_values give {image_embeds.shape[0]} "
                f"({pixel_values.shape[0]} tiles x {self.config.tokens_per_tile} tokens per tile)"
            )
        return embeds.masked_scatter(mask.unsqueeze(-1), image_embeds)

    # ------------------------------------------------------------------ forward
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (tokens, hidden) of the packed input."""
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be 1-D (all packed tokens), got shape {tuple(input_ids.shape)}")
        total = input_ids.shape[0]
        if cache is not None:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens cannot be combined with a KV cache (one sequence per cache)")
            if cache.length + total > cache.capacity:
                raise ValueError(f"KV cache holds {cache.capacity} tokens; {cache.length} + {total} do not fit")
            if position_ids is None:
                position_ids = torch.arange(cache.length, cache.length + total, device=input_ids.device)
            # the decoder builds the cache's document offsets itself, once per call
        else:
            if cu_seqlens is None:
                cu_seqlens = torch.tensor([0, total], dtype=torch.int32, device=input_ids.device)
                max_seqlen = total
            elif cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
                raise ValueError(f"cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # one host sync; pass it to avoid
            if position_ids is None:
                position_ids = positions_from_cu_seqlens(cu_seqlens, total)
        embeds = self.embed(input_ids, pixel_values)
        return self.text(embeds, position_ids, cu_seqlens, max_seqlen, cache)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        logits_index: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (rows, vocab): all rows, or only ``logits_index`` (gather, then project)."""
        hidden = self.hidden_states(
            input_ids, pixel_values, position_ids=position_ids, cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen, cache=cache,
        )
        if logits_index is None:
            return self.lm_head(hidden)
        return gather_logits(hidden, self.lm_head.weight, logits_index)

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        ignore_index: int = -100,
        num_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy; ``labels`` are aligned with ``input_ids`` (row i's
        label is the token it predicts, -100 where ignored). Logits are never materialised."""
        hidden = self.hidden_states(
            input_ids, pixel_values, position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen
        )
        return linear_cross_entropy(hidden, self.lm_head.weight, labels, ignore_index=ignore_index, num_valid=num_valid)

    def check_length(self, tokens: int) -> None:
        """Raise ValueError when one sequence of ``tokens`` positions would pass the
        model's ``max_position_embeddings`` (checked before any work is done)."""
        limit = self.config.text.max_position_embeddings
        if tokens > limit:
            raise ValueError(
                f"the sequence needs {tokens} positions but the model's max_position_embeddings is {limit}"
            )

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        eos_token_id: int | None = None,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Yield new token ids of one sequence: prefill once, then KV-cached decode.

        Only the last position reaches the LM head at every step. ``temperature=0`` is greedy.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if input_ids.dim() != 1 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty 1-D prompt, got shape {tuple(input_ids.shape)}")
        self.check_length(input_ids.shape[0] + max_new_tokens)
        dtype = self.text.embed_tokens.weight.dtype
        cache = KVCache.empty(self.config.text, input_ids.shape[0] + max_new_tokens, input_ids.device, dtype)
        last = torch.tensor([input_ids.shape[0] - 1], device=input_ids.device)
        logits = self(input_ids, pixel_values, cache=cache, logits_index=last)
        zero = torch.zeros(1, dtype=torch.long, device=input_ids.device)
        for step in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits[-1].float() / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            else:
                token = int(logits[-1].argmax())
            yield token
            # the last token needs no forward of its own: stop before computing its logits
            if step == max_new_tokens - 1 or (eos_token_id is not None and token == eos_token_id):
                return
            logits = self(torch.tensor([token], device=input_ids.device), cache=cache, logits_index=zero)

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
