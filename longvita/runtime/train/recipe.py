"""Training recipes: Long-VITA's four stages (paper, Table 2) as dataclass presets.

``recipe(stage, name)`` returns a ``StageRecipe``; every field can be overridden with
``apply_overrides`` from ``key=value`` strings (``longvita train --set lr_llm=1e-4``) or a
mapping read from a JSON/YAML file (``load_config``).

Presets:
- ``paper``: the paper's Table 2. Stage 1 (32K tokens) trains the projector only at 1e-3;
  stages 2-4 (16K, 128K, 1M) train everything: the vision tower at 1e-6 with layer-wise
  decay 0.9 (layer i of L gets ``lr * 0.9**(L-1-i)``, so deeper layers learn faster, the
  patch embedding ``lr * 0.9**L``), projector and LLM at 1e-5. Cosine schedule with a
  warm-up, weight decay 0, gradient clip 1.0, Adam betas (0.9, 0.999). Packs reset
  attention and positions per sample in stages 1-2 (``reset=True``) and not in 3-4.
- ``long-vita-release``: as ``paper``, but stages 3-4 at 5e-6 with the vision tower frozen
  (how the released checkpoints were trained for long context).
- ``demo``: the demo model from scratch (``longvita train --recipe demo``): everything
  trains at 1e-3 (100 warm-up steps, cosine to 5 %), 1,024-token packs, on the generated
  demo set (``longvita.data.demo``).

This module imports only the standard library: the CLI checks ``longvita train``'s
arguments with it before torch loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from longvita.common import LongVITAError

__all__ = ["RecipeError", "DEMO_SAMPLES", "DEMO_SEQ_LEN", "DEMO_STEPS", "RECIPES", "StageRecipe", "apply_overrides", "load_config",
           "lr_factor", "recipe"]

RECIPES = ("paper", "long-vita-release", "demo")
# activation checkpointing: auto, or a policy of runtime.train.parallelize.AC_POLICIES
AC_CHOICES = ("auto", "none", "full", "every-other", "mlp")
LONG_SEQUENCE_AC = 16384  # auto: packs from this long recompute every layer (memory over speed)
DEMO_SEQ_LEN = 1024
DEMO_SAMPLES = 57000  # the demo recipe's generated training set: one pass of the default run (~50 s to write)
DEMO_STEPS = 7100  # the demo recipe's length: with the data, under 30 minutes on 2 CPU cores
SEQ_LEN = {1: 32 * 1024, 2: 16 * 1024, 3: 128 * 1024, 4: 1024 * 1024}


class RecipeError(LongVITAError, ValueError):
    """A recipe key or value that is not what the recipe takes (the message names the key)."""


@dataclass
class StageRecipe:
    """Everything one training stage sets (the CLI's ``--set`` keys are these names)."""

    stage: int = 1
    name: str = "paper"
    seq_len: int = SEQ_LEN[1]
    reset: bool = True  # packs restart attention and positions per sample
    train_vision: bool = False
    train_projector: bool = True
    train_llm: bool = False
    lr_vision: float = 1e-6
    layer_decay: float = 0.9  # vision layer i of L: lr_vision * layer_decay ** (L - 1 - i)
    lr_projector: float = 1e-3
    lr_llm: float = 1e-5
    warmup_ratio: float = 0.03  # share of the steps spent warming up linearly from 0
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0: off
    # auto (full from 16K-token packs, else none), none, full, every-other, mlp
    # (runtime.train.parallelize.AC_POLICIES); the train command's flag overrides it
    activation_checkpointing: str = "auto"
    label_smoothing: float = 0.0  # as F.cross_entropy defines it
    z_loss: float = 0.0  # PaLM's z-loss weight: z_loss * lse**2 per labelled token
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def validate(self) -> "StageRecipe":
        problems = []
        if self.stage not in (1, 2, 3, 4):
            problems.append(f"stage must be 1-4, got {self.stage}")
        if self.seq_len < 2:
            problems.append(f"seq_len must be >= 2, got {self.seq_len}")
        for key in ("lr_vision", "lr_projector", "lr_llm", "weight_decay", "grad_clip", "eps"):
            v = getattr(self, key)
            if not (v >= 0 and math.isfinite(v)):
                problems.append(f"{key} must be a finite number >= 0, got {v}")
        if self.activation_checkpointing not in AC_CHOICES:
            problems.append(f"activation_checkpointing must be one of {', '.join(AC_CHOICES)}, got "
                            f"{self.activation_checkpointing!r}")
        if not (self.z_loss >= 0 and math.isfinite(self.z_loss)):
            problems.append(f"z_loss must be a finite number >= 0, got {self.z_loss}")
        for key in ("beta1", "beta2", "warmup_ratio", "min_lr_ratio", "layer_decay", "label_smoothing"):
            v = getattr(self, key)
            if not 0 <= v <= 1:
                problems.append(f"{key} must be in [0, 1], got {v}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (self.train_vision or self.train_projector or self.train_llm):
            problems.append("nothing to train: train_vision, train_projector and train_llm are all false")
        if problems:
            raise RecipeError("recipe: " + "; ".join(problems))
        return self

    def warmup(self, steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(math.ceil(self.warmup_ratio * steps))

    def ac_policy(self) -> str:
        """The activation-checkpointing policy this recipe runs (``auto`` resolved)."""
        if self.activation_checkpointing != "auto":
            return self.activation_checkpointing
        return "full" if self.seq_len >= LONG_SEQUENCE_AC else "none"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def recipe(stage: int, name: str = "paper") -> StageRecipe:
    """The preset of ``stage`` (1-4) in recipe ``name`` (``paper``, ``long-vita-release``, ``demo``)."""
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    if stage not in SEQ_LEN:
        raise RecipeError(f"stage must be 1, 2, 3 or 4, got {stage}")
    r = StageRecipe(stage=stage, name=name, seq_len=SEQ_LEN[stage], reset=stage <= 2)
    if stage >= 2:
        r.train_vision = r.train_projector = r.train_llm = True
        r.lr_projector = 1e-5
    if name == "long-vita-release" and stage >= 3:
        r.train_vision = False
        r.lr_projector = r.lr_llm = 5e-6
    if name == "demo":  # the demo model from scratch: everything trains, fast, short packs
        r = StageRecipe(stage=stage, name=name, seq_len=DEMO_SEQ_LEN, reset=True, train_vision=True,
                        train_projector=True, train_llm=True, lr_vision=1e-3, layer_decay=1.0, lr_projector=1e-3,
                        lr_llm=1e-3, warmup_steps=100, min_lr_ratio=0.05, weight_decay=0.01, beta2=0.98)
    return r.validate()


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based): linear warm-up over
    ``warmup`` steps, then a cosine from 1 to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _coerce(key: str, value: Any, kind) -> Any:
    kind = str(kind)
    if isinstance(value, str):
        text = value.strip()
        if "None" in kind and text.lower() in ("none", "null", ""):
            return None
        try:
            if kind.startswith("bool"):
                if text.lower() in _TRUE:
                    return True
                if text.lower() in _FALSE:
                    return False
                raise ValueError
            if kind.startswith("int"):
                return int(text)
            if kind.startswith("float"):
                return float(text)
        except ValueError:
            raise RecipeError(f"{key}={value!r}: expected {kind.split(' ')[0]}") from None
        return text
    if kind.startswith("bool") and not isinstance(value, bool):
        raise RecipeError(f"{key}={value!r}: expected true or false")
    if kind.startswith("float") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind.startswith("int") and not (isinstance(value, int) and not isinstance(value, bool)):
        if value is None and "None" in kind:
            return None
        raise RecipeError(f"{key}={value!r}: expected an integer")
    return value


def apply_overrides(r: StageRecipe, overrides: Mapping[str, Any] | list[str]) -> StageRecipe:
    """A copy of ``r`` with fields replaced: a mapping, or ``key=value`` strings. Unknown
    keys and values of the wrong type raise ValueError naming the key."""
    if not isinstance(overrides, Mapping):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise RecipeError(f"expected key=value, got {item!r}")
            k, v = item.split("=", 1)
            pairs[k.strip().replace("-", "_")] = v
        overrides = pairs
    fields = {f.name: f.type for f in dataclasses.fields(StageRecipe)}
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            raise RecipeError(f"unknown recipe key {key!r}; keys are {', '.join(fields)}")
        changes[key] = _coerce(key, value, fields[key])
    return dataclasses.replace(r, **changes).validate()


def load_config(path: str | Path) -> dict:
    """A flat mapping of recipe keys (and the train command's own keys) from a JSON file,
    or YAML when PyYAML is importable and the file ends in .yaml/.yml."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"--config {path}: file does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"--config {path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise RecipeError(f"--config {path}: unreadable ({exc.strerror or exc})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise RecipeError(f"--config {path}: YAML needs PyYAML (pip install pyyaml), or write JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"--config {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"--config {path}: expected a mapping of key: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
