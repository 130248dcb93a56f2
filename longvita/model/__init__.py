"""The Long-VITA model in plain PyTorch: config, vision encoder, projector, text decoder,
the composed model, and checkpoint I/O."""

from longvita.model.checkpoint import CheckpointError  # noqa: F401
from longvita.model.config import (  # noqa: F401
    LongVITAConfig,
    ProjectorConfig,
    TextConfig,
    VisionConfig,
    preset,
)
from longvita.model.longvita import LongVITA, positions_from_cu_seqlens  # noqa: F401
from longvita.model.sampling import Sampling  # noqa: F401
from longvita.model.attention import CachedAttention, DecoderAttention, KVCache, PackedAttention  # noqa: F401

__all__ = [
    "LongVITA", "LongVITAConfig", "VisionConfig", "ProjectorConfig", "TextConfig", "preset",
    "KVCache", "CheckpointError", "positions_from_cu_seqlens",
    "DecoderAttention", "PackedAttention", "CachedAttention", "Sampling",
]
