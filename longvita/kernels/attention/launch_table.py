"""Which varlen-attention kernel variant and launch config run for a shape: the launch table.

The Triton kernels (``attention/triton.py``) come in variants, each a set of features that
can be combined with ``+`` (``"tma+sorted"``); ``"default"`` is the set of none, the kernels
measured on an H100 on 2026-11-25:

  tma         K/V (and Q/O) tiles through device-side TMA tensor descriptors
              (``tl.make_tensor_descriptor``), one descriptor per document, so rows past a
              document's end read zeros and stores past it are clipped by the copy engine;
              falls back to pointer loads when a tensor is not 16-byte aligned
  sorted      the causal-aware schedule: a work list of (document, block) items sorted by
              their cost (visible keys), heaviest first, launched as one flat grid in that
              order, so the last wave holds short blocks and not one long diagonal
  persistent  the same sorted work list walked by a persistent grid (a few programs per SM,
              each taking items round-robin)
  ws          ``tl.range(..., warp_specialize=True)`` on the forward's key loop: one loop,
              masked throughout, of TMA loads (Triton 3.6's Hopper pass accepts no other
              form), so ``ws`` implies ``tma``; its configs have ``num_warps=4``, which the
              pass turns into a producer and two consumer warp groups (12 warps). The
              interpreter ignores the specialisation (it runs the one masked loop).
              Refused on GPUs: an H100 gave non-finite outputs with it (2026-12-05)
  fused_bwd   the backward in one kernel: dK/dV per key block as before, dQ added into an
              fp32 buffer with atomics (not bit-wise deterministic), instead of two kernels
  budget      the spill-free launch configs at head dim 128 (``compile_report.py`` shows
              0 bytes of spills) instead of the measured ones, which spill a little

``sorted`` and ``persistent`` exclude each other. Forward and backward pick their variant
separately: the table's ``choice`` holds one per (padded head dim, causal) and per pass;
features that do not apply to a pass are ignored there (``ws`` in the backward,
``fused_bwd`` in the forward).

Selection, first that applies: the launchers' ``variant=`` argument (benchmarks), the
environment variable ``LONGVITA_ATTENTION_VARIANT`` (for every shape and both passes), the
table's ``choice`` for the shape, ``"default"``.

The table is ``launch_table.json`` beside this file; ``benchmarks/tune_attention.py
--write-table`` writes it after measuring variant x config on a GPU. A variant becomes
the choice for a shape only when a chip measured it faster; until then it is selectable.
Configs: ``configs[variant][kernel][block_d]``; a variant takes the most specific entry
whose features it has (``table_config``), down to ``default``; 16-bit inputs with a head
dim that is a power of two only (fp32 and padded head dims keep the reasoned configs of
``triton.py``). This module imports neither triton nor torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

ENV = "LONGVITA_ATTENTION_VARIANT"
FEATURES = ("tma", "sorted", "persistent", "ws", "fused_bwd", "budget")
KERNELS = ("fwd", "dkdv", "dq", "bwd_fused")
TABLE_PATH = Path(__file__).with_name("launch_table.json")
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


@dataclass(frozen=True)
class AttentionVariant:
    """One kernel variant: the features of the module docstring."""

    tma: bool = False
    schedule: str = "grid"  # 'grid' (one program per block, as measured), 'sorted', 'persistent'
    warp_specialize: bool = False
    fused_bwd: bool = False
    budget: bool = False

    @property
    def name(self) -> str:
        return "+".join(f for f in FEATURES if f in self.features()) or "default"

    def features(self, kernel: str | None = None) -> frozenset[str]:
        """The variant's features; with ``kernel``, those that change that kernel's code."""
        feats = {f for f, on in (("tma", self.tma), ("sorted", self.schedule == "sorted"),
                                 ("persistent", self.schedule == "persistent"), ("ws", self.warp_specialize),
                                 ("fused_bwd", self.fused_bwd), ("budget", self.budget)) if on}
        if kernel == "fwd":
            feats.discard("fused_bwd")
        elif kernel is not None:
            feats.discard("ws")
        return frozenset(feats)


def parse_variant(name: str, what: str = "variant") -> AttentionVariant:
    """``"tma+sorted"`` -> AttentionVariant; ``"default"`` or ``""`` -> no feature.
    Raises ValueError naming ``what`` for an unknown feature or a contradiction."""
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a string of features joined by '+', got {name!r}")
    feats = [f.strip() for f in name.split("+") if f.strip()]
    if feats == ["default"]:
        feats = []
    unknown = [f for f in feats if f not in FEATURES]
    if unknown:
        raise ValueError(f"{what} must be 'default' or features from {FEATURES} joined by '+', got {name!r} "
                         f"(unknown: {', '.join(unknown)})")
    if "sorted" in feats and "persistent" in feats:
        raise ValueError(f"{what}: 'sorted' and 'persistent' are two schedules, pick one (got {name!r})")
    schedule = "sorted" if "sorted" in feats else "persistent" if "persistent" in feats else "grid"
    # 'ws' implies 'tma': the warp-specialisation pass takes descriptor loads only
    return AttentionVariant(tma="tma" in feats or "ws" in feats, schedule=schedule, warp_specialize="ws" in feats,
                            fused_bwd="fused_bwd" in feats, budget="budget" in feats)


DEFAULT = AttentionVariant()

_TABLE: dict | None = None


def _check_table(table: dict, where: str) -> dict:
    """Validates a table's structure; returns it. Errors name the file and the entry."""
    if not isinstance(table, dict) or not isinstance(table.get("configs"), dict):
        raise ValueError(f"{where}: a launch table is a JSON object with 'configs' (and 'choice')")
    for entry in table.get("choice", []):
        missing = {"block_d", "causal", "fwd", "bwd"} - set(entry)
        if missing:
            raise ValueError(f"{where}: choice entry {entry} lacks {sorted(missing)}")
        parse_variant(entry["fwd"], f"{where}: choice fwd")
        parse_variant(entry["bwd"], f"{where}: choice bwd")
    for variant, kernels in table["configs"].items():
        parse_variant(variant, f"{where}: configs key")
        for kernel, by_d in kernels.items():
            if kernel not in KERNELS:
                raise ValueError(f"{where}: configs[{variant!r}] names kernel {kernel!r}, expected one of {KERNELS}")
            for d, cfg in by_d.items():
                if not str(d).isdigit() or not all(isinstance(cfg.get(k), int) for k in CONFIG_KEYS):
                    raise ValueError(f"{where}: configs[{variant!r}][{kernel!r}][{d!r}] must map a head dim to "
                                     f"integer {CONFIG_KEYS}, got {cfg}")
    return table


def load_table(path: str | os.PathLike | None = None) -> dict:
    """The launch table (cached when read from its default place)."""
    global _TABLE
    if path is None and _TABLE is not None:
        return _TABLE
    p = Path(path) if path is not None else TABLE_PATH
    table = _check_table(json.loads(p.read_text()), str(p))
    if path is None:
        _TABLE = table
    return table


def set_table(table: dict | None) -> None:
    """Replace the cached table (``None``: read the file again at the next launch). For the
    tuning script, which times candidates through the launchers."""
    global _TABLE
    _TABLE = _check_table(table, "set_table") if table is not None else None


def variant_for(passname: str, block_d: int, causal: bool, explicit: str | AttentionVariant | None = None) -> AttentionVariant:
    """The variant one pass ('fwd' or 'bwd') runs for a shape (see the module docstring)."""
    if isinstance(explicit, AttentionVariant):
        return explicit
    if explicit is not None:
        return parse_variant(explicit, "variant")
    env = os.environ.get(ENV)
    if env:
        return parse_variant(env, ENV)
    for entry in load_table().get("choice", []):
        if entry["block_d"] == block_d and bool(entry["causal"]) == bool(causal):
            return parse_variant(entry[passname], f"launch table choice {passname}")
    return DEFAULT


# When two table entries match a variant equally well, the feature that constrains the
# launch most decides: 'ws' needs 4-warp configs (Triton's Hopper warp specialisation adds
# its own warp groups), 'budget' exists for its configs, the schedules and TMA change shared
# memory use.
_PRIORITY = {"ws": 5, "budget": 4, "persistent": 3, "sorted": 2, "tma": 1, "fused_bwd": 0}


def table_config(kernel: str, block_d: int, variant: AttentionVariant) -> dict | None:
    """The table's launch config of one kernel, or None (then the launcher reasons one).

    Among the table's variants whose features are a subset of this variant's features that
    change the kernel, the most specific one with a config for (kernel, block_d) wins:
    ``tma+persistent`` takes a ``tma+persistent`` entry, else a ``persistent`` or ``tma``
    one, else ``default``."""
    configs = load_table()["configs"]
    want = variant.features(kernel)
    best, best_key = None, None
    for name, kernels in configs.items():
        feats = parse_variant(name).features()
        cfg = kernels.get(kernel, {}).get(str(block_d))
        if cfg is None or not feats <= want:
            continue
        key = (len(feats), sum(_PRIORITY[f] for f in feats))
        if best_key is None or key > best_key:
            best, best_key = cfg, key
    return {k: best[k] for k in CONFIG_KEYS} if best is not None else None


def measured_configs() -> dict[tuple[str, int], dict]:
    """``{(kernel, block_d): config}`` of the default variant's configs measured on a chip
    (entries with ``"measured"``): the ones the compile report lets spill within a bound."""
    out = {}
    for kernel, by_d in load_table()["configs"].get("default", {}).items():
        for d, cfg in by_d.items():
            if cfg.get("measured"):
                out[kernel, int(d)] = {k: cfg[k] for k in CONFIG_KEYS}
    return out
