"""longvita's kernels from transformers: an attention implementation, a one-call patch, and
context parallelism for transformers' decoders. Importing this package imports transformers
(the ``transformers`` extra) and registers the attention implementation ``"longvita"``.

- ``attn_implementation="longvita"`` (``attention.py``): ``AutoModelForCausalLM.from_pretrained(
  ..., attn_implementation="longvita")`` or ``model.set_attn_implementation("longvita")``.
  Packed batches (``DataCollatorWithFlattening``: ``cu_seq_lens_q/k`` or restarting
  ``position_ids``), padded batches, ``generate()`` with transformers' KV caches, sliding
  windows, GQA without repeating K/V; exact (in float64 it equals SDPA with the explicit
  block-diagonal, padding or window mask, logits and gradients).
- ``apply_longvita(model, attention=True, fused_loss=True)`` (``patch.py``): the attention
  above and, when ``labels`` are passed, the loss from the fused linear cross-entropy (no
  logits) for Qwen2/Qwen2.5, Qwen3, Llama, Mistral causal LMs and InternVL.
- ``context_parallel(model, group)`` + ``shard_batch(batch, group)`` (``context_parallel.py``):
  zigzag-sharded packed batches, ring attention inside the model, global positions, and a
  loss that is each rank's share of the global mean (sum the gradients over the ranks).

The scheme and the memory of each piece are in its module's docstring.
"""

from longvita.integrations.transformers.attention import (
    ATTN_IMPLEMENTATION,
    CP_KWARG,
    TokenLayout,
    longvita_attention,
    longvita_attention_mask,
    register,
)
from longvita.integrations.transformers.context_parallel import context_parallel, shard_batch
from longvita.integrations.transformers.patch import BASE_MODELS, CAUSAL_LMS, apply_longvita

__all__ = [
    "ATTN_IMPLEMENTATION", "BASE_MODELS", "CAUSAL_LMS", "CP_KWARG", "TokenLayout", "apply_longvita",
    "context_parallel", "longvita_attention", "longvita_attention_mask", "register", "shard_batch",
]

register()
