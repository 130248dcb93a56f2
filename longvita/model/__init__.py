"""The Long-VITA model in plain PyTorch: config, vision encoder, projector, text decoder,
the composed model (embed -> decoder -> logits / loss), the decoder's attention
interface, and checkpoint I/O. Imports ``longvita.kernels`` and nothing distributed."""

from longvita.model.attention import (  # noqa: F401
    CachedAttention,
    DecoderAttention,
    KVCache,
    PackedAttention,
    positions_from_cu_seqlens,
)
from longvita.model.checkpoint import CheckpointError  # noqa: F401
from longvita.model.config import (  # noqa: F401
    ContextLengthWarning,
    LongVITAConfig,
    ProjectorConfig,
    TextConfig,
    VisionConfig,
    preset,
)
from longvita.model.longvita import LongVITA  # noqa: F401

__all__ = [
    "LongVITA", "LongVITAConfig", "ContextLengthWarning", "VisionConfig", "ProjectorConfig", "TextConfig", "preset",
    "KVCache", "CheckpointError", "positions_from_cu_seqlens",
    "DecoderAttention", "PackedAttention", "CachedAttention",
]
