"""Adapters that put longvita's kernels inside other libraries' models.

``longvita.integrations.transformers``: the attention implementation ``"longvita"`` for
transformers' ``AttentionInterface``, ``apply_longvita(model)`` (attention and the fused
linear cross-entropy loss in a loaded model) and context parallelism for transformers'
decoders (``context_parallel``, ``shard_batch``).

This package imports nothing at its top: ``import longvita`` never imports transformers,
which stays an optional extra (``pip install 'longvita[transformers]'``). Importing
``longvita.integrations.transformers`` imports transformers and registers ``"longvita"``.
Layer rule (docs/architecture.md, "Layers"): integrations sit beside ``runtime`` and may
import kernels, model, data, parallel and runtime; nothing in longvita imports them.
"""
