"""Configs as dataclasses, with named presets.

Long-VITA-14B = InternViT-300M-448px -> pixel shuffle (0.5) -> LayerNorm(4096) ->
Linear(4096->1024, no bias) -> GELU -> Linear(1024->5120, no bias) -> Qwen2.5-14B.
InternVL's own projector has biases and a 5120-wide middle, so width and biases are config.

``LongVITAConfig.preprocess`` names the preprocessing family the checkpoint was trained
with (``long-vita`` or ``internvl``: thumbnail position, video frame padding and
sampling, media token layout); the data layer implements both.
``LongVITAConfig.trained_length`` is the longest sequence the weights were trained on
(``longvita_trained_length`` in config.json), when known: generation and the NIAH grid
warn (``ContextLengthWarning``) past it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# activation names (transformers' spelling) each module implements; see vision.py, text.py.
# The projector's GELU is fused into the pixel-shuffle kernel family, which computes the
# exact (erf) GELU only.
VISION_ACTIVATIONS = ("gelu",)
PROJECTOR_ACTIVATIONS = ("gelu",)
TEXT_ACTIVATIONS = ("silu",)


class ContextLengthWarning(UserWarning):
    """A sequence longer than the model's trained length (``LongVITAConfig.trained_length``):
    its positions past that are declared (``max_position_embeddings``) but were never
    trained, so what the model says there may be wrong."""


@dataclass
class VisionConfig:
    """InternViT encoder."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    select_layer: int = -1  # which layer's output feeds the projector (-1: the last)
    # per-channel normalisation the encoder applies to uint8 pixels (float input arrives
    # normalised); both families use ImageNet's
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ProjectorConfig:
    """Pixel shuffle + LayerNorm + Linear -> GELU -> Linear."""

    scale_factor: float = 0.5
    intermediate_size: int = 1024  # Long-VITA: 1024; InternVL: the text hidden size
    bias: bool = False  # Long-VITA: no biases; InternVL: biases
    layer_norm_eps: float = 1e-5  # nn.LayerNorm's default, as both families use
    hidden_act: str = "gelu"


@dataclass
class TextConfig:
    """Qwen2 / Qwen2.5 decoder."""

    vocab_size: int = 152064
    hidden_size: int = 5120
    num_layers: int = 48
    num_heads: int = 40
    num_kv_heads: int = 8
    intermediate_size: int = 13824
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 1048576
    # width of one attention head. Qwen2 derives it (hidden_size // num_heads); a config
    # may also give it explicitly, so None at construction is resolved here and the field
    # is always an int afterwards (VisionConfig.head_dim means the same thing)
    head_dim: int | None = None

    def __post_init__(self):
        # only from well-typed fields: a config read from a file is validated afterwards
        if self.head_dim is None and all(isinstance(x, int) and x > 0 for x in (self.num_heads, self.hidden_size)):
            self.head_dim = self.hidden_size // self.num_heads


# (minimum, maximum) of every numeric field, for ``LongVITAConfig.validate``; an int field
# must hold an int, a float field a finite number, a bool field true/false, a str field a string
_BIG = 1 << 40
_VISION_RANGES = {"hidden_size": (1, _BIG), "num_layers": (1, 4096), "num_heads": (1, 4096),
                  "intermediate_size": (1, _BIG), "image_size": (1, 1 << 16), "patch_size": (1, 1 << 16),
                  "num_channels": (1, 64), "layer_norm_eps": (0.0, 1.0), "select_layer": (-4096, 4096)}
_PROJECTOR_RANGES = {"scale_factor": (1e-3, 1.0), "intermediate_size": (1, _BIG), "layer_norm_eps": (0.0, 1.0)}
_TEXT_RANGES = {"vocab_size": (1, 1 << 31), "hidden_size": (1, _BIG), "num_layers": (1, 4096), "num_heads": (1, 4096),
                "num_kv_heads": (1, 4096), "intermediate_size": (1, _BIG), "rope_theta": (1e-6, 1e30),
                "rms_norm_eps": (0.0, 1.0), "max_position_embeddings": (1, 1 << 40), "head_dim": (2, 1 << 16)}


def _field_problems(prefix: str, obj, ranges: dict) -> list[str]:
    import math

    problems = []
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), str(f.type)
        name = f"{prefix}.{f.name}"
        if kind.startswith("bool"):
            if not isinstance(value, bool):
                problems.append(f"{name} must be true or false, got {value!r}")
        elif kind.startswith("int"):
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"{name} must be an integer, got {value!r}")
            elif f.name in ranges and not ranges[f.name][0] <= value <= ranges[f.name][1]:
                lo, hi = ranges[f.name]
                problems.append(f"{name} must be in [{lo}, {hi}], got {value}")
        elif kind.startswith("float"):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                problems.append(f"{name} must be a finite number, got {value!r}")
            elif f.name in ranges and not ranges[f.name][0] <= value <= ranges[f.name][1]:
                lo, hi = ranges[f.name]
                problems.append(f"{name} must be in [{lo}, {hi}], got {value}")
        elif kind.startswith("str"):
            if not isinstance(value, str):
                problems.append(f"{name} must be a string, got {value!r}")
        elif kind.startswith("tuple[float"):
            if not (isinstance(value, (tuple, list)) and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)):
                problems.append(f"{name} must be a list of finite numbers, got {value!r}")
    return problems


# the preprocessing families longvita.data implements (kept in step with
# longvita.data.image.PREPROCESS_FAMILIES by a test: model does not import data)
PREPROCESS_FAMILIES = ("long-vita", "internvl")


@dataclass
class LongVITAConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tie_word_embeddings: bool = False
    # ids of the placeholder tokens that projected tile embeddings replace, in order
    # (<IMG_CONTEXT>, <PATCH_CONTEXT>, <VID_CONTEXT>); they come from the checkpoint's
    # tokenizer or config, never hard-coded
    image_token_ids: tuple[int, ...] = ()
    # which family's preprocessing the checkpoint expects; loading a checkpoint sets it
    # from its layout (Long-VITA's -> long-vita, InternVL's and transformers' -> internvl)
    # unless its config.json records it; new models (the tiny preset) use Long-VITA's
    preprocess: str = "long-vita"
    # the longest sequence (tokens) the weights were trained on, when known: positions past
    # it are declared (max_position_embeddings) but untrained, so generate and eval niah
    # warn there. None: unknown (a checkpoint from elsewhere); 0: not trained yet (a model
    # initialised for training from scratch). The trainer raises it to its pack length.
    trained_length: int | None = None

    def past_trained_length(self, tokens: int) -> bool:
        """Whether a sequence of ``tokens`` reaches past the trained length (False when it is unknown)."""
        return self.trained_length is not None and tokens > self.trained_length

    @property
    def tokens_per_tile(self) -> int:
        inv = round(1 / self.projector.scale_factor)
        return self.vision.num_patches // (inv * inv)

    def validate(self) -> "LongVITAConfig":
        """Check every field's type and range, then the relations between fields; raise one
        ValueError listing every problem (a config read from a file holds whatever the file
        says: a string where a number belongs, a negative layer count, NaN)."""
        problems = _field_problems("vision", self.vision, _VISION_RANGES) + _field_problems(
            "projector", self.projector, _PROJECTOR_RANGES) + _field_problems("text", self.text, _TEXT_RANGES)
        if not isinstance(self.tie_word_embeddings, bool):
            problems.append(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if not isinstance(self.image_token_ids, tuple) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.image_token_ids):
            problems.append(f"image_token_ids must be non-negative token ids, got {self.image_token_ids!r}")
        if self.preprocess not in PREPROCESS_FAMILIES:
            problems.append(f"preprocess must be one of {list(PREPROCESS_FAMILIES)}, got {self.preprocess!r}")
        if self.trained_length is not None and (not isinstance(self.trained_length, int) or isinstance(
                self.trained_length, bool) or self.trained_length < 0):
            problems.append(f"trained_length (config.json: longvita_trained_length) must be a token count >= 0 or "
                            f"null, got {self.trained_length!r}")
        if problems:  # relations are only checked between well-typed fields
            raise ValueError("invalid LongVITAConfig: " + "; ".join(problems))
        v, p, t = self.vision, self.projector, self.text
        if v.hidden_size % v.num_heads:
            problems.append(f"vision.hidden_size ({v.hidden_size}) must be divisible by vision.num_heads ({v.num_heads})")
        if v.image_size % v.patch_size:
            problems.append(f"vision.image_size ({v.image_size}) must be a multiple of vision.patch_size ({v.patch_size})")
        inv = 1 / p.scale_factor
        if abs(inv - round(inv)) > 1e-6 or (v.image_size // v.patch_size) % round(inv):
            problems.append(
                f"projector.scale_factor ({p.scale_factor}) must be 1/n with n dividing the patch grid ({v.image_size // v.patch_size})"
            )
        if t.num_heads % t.num_kv_heads:
            problems.append(f"text.num_heads ({t.num_heads}) must be divisible by text.num_kv_heads ({t.num_kv_heads})")
        if t.head_dim % 2:
            problems.append(f"text.head_dim ({t.head_dim}) must be a positive even number (RoPE rotates pairs)")
        if v.select_layer == 0 or abs(v.select_layer) > v.num_layers:
            problems.append(f"vision.select_layer ({v.select_layer}) must pick one of the {v.num_layers} layers "
                            f"(1..{v.num_layers} or -{v.num_layers}..-1)")
        # the modules implement these activations and no others: a checkpoint asking for
        # another one must fail here, not compute something else silently
        for where, act, allowed in (
            ("vision.hidden_act", v.hidden_act, VISION_ACTIVATIONS),
            ("projector.hidden_act", p.hidden_act, PROJECTOR_ACTIVATIONS),
            ("text.hidden_act", t.hidden_act, TEXT_ACTIVATIONS),
        ):
            if act not in allowed:
                problems.append(f"{where} {act!r} is not implemented (supported: {', '.join(allowed)})")
        if problems:
            raise ValueError("invalid LongVITAConfig: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LongVITAConfig":
        return cls(
            vision=VisionConfig(**d.get("vision", {})),
            projector=ProjectorConfig(**d.get("projector", {})),
            text=TextConfig(**d.get("text", {})),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            image_token_ids=tuple(d.get("image_token_ids", ())),
            preprocess=d.get("preprocess", "long-vita"),
            trained_length=d.get("trained_length"),
        ).validate()


def _tiny() -> LongVITAConfig:
    # seconds on a CPU: 56-px tiles of 14-px patches -> 16 patches -> 4 tokens per tile
    return LongVITAConfig(
        vision=VisionConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, image_size=56),
        projector=ProjectorConfig(intermediate_size=48),
        text=TextConfig(
            vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            # RoPE has no position table, so the limit is only declared; the tiny preset
            # declares the 14B preset's 1M so a 1M-token library's demo accepts long
            # prompts (a real checkpoint's limit is read from its config and enforced)
            intermediate_size=128, max_position_embeddings=1048576,
        ),
    )


def _demo() -> LongVITAConfig:
    # the demo model (longvita train --recipe demo): trains on 2 CPU cores in minutes.
    # 112-px tiles of 14-px patches -> 64 patches -> 16 tokens per tile; 4.4M parameters
    # with the built-in byte-level tokenizer's 268 ids
    return LongVITAConfig(
        vision=VisionConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, image_size=112),
        projector=ProjectorConfig(intermediate_size=256),
        text=TextConfig(
            vocab_size=512, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
            intermediate_size=768, max_position_embeddings=1048576,
            # RoPE base 1e4, not Qwen2.5's 1e6: with 32-dim heads and 1K-token packs, 1e6
            # leaves ~3 of 16 frequencies that resolve neighbouring positions, and the
            # previous-token heads copying is built from formed measurably slower
            rope_theta=1e4,
        ),
    )


def _long_vita_14b() -> LongVITAConfig:
    return LongVITAConfig(vision=VisionConfig(), projector=ProjectorConfig(), text=TextConfig())


PRESETS = {"tiny": _tiny, "demo": _demo, "long-vita-14b": _long_vita_14b}


def preset(name: str) -> LongVITAConfig:
    """A named config: ``tiny`` (tests), ``demo`` (the trained demo model) or ``long-vita-14b``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]().validate()
