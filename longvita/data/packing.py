"""Fixed-length packs of tokenised samples, per-stage source mixtures with a resumable
position, and the stream of packs a trainer reads.

Packing is sequential: samples are laid into the current pack in stream order until the
next one does not fit; the pack is then padded to ``seq_len`` and the sample that did not
fit opens the next pack. (Sequential rather than first-fit so that the data position is
one index: a resumed run rebuilds the exact same packs.)

Each data-parallel group of a run reads its own strided part of a mixture
(``PackStream.shard``), so a rank tokenises only the samples of its own packs.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from tokenizers import Tokenizer

from longvita.common import IGNORE_INDEX
from longvita.data.errors import InputError
from longvita.data.image import normalize
from longvita.data.tokenizer import SpecialTokens
from longvita.data.training import (
    DataWarning,
    MediaConfig,
    Sample,
    TokenizedSample,
    read_manifest,
    tokenize_sample,
    truncate,
)

__all__ = ["Mixture", "Pack", "PackStream", "pack_samples", "pack_stream", "stage_ratios"]


@dataclass
class Pack:
    """One fixed-length training sequence.

    input_ids / labels: int64 ``(n,)`` with n = seq_len; padding has ``pad_id`` and
        label IGNORE_INDEX. Labels are already shifted (no shift in the loss).
    position_ids: int64 ``(n,)``: restarting at 0 per sample when ``reset``, else 0..n-1.
    cu_seqlens: int32 document boundaries for varlen attention: per sample (the padding
        a document of its own) when ``reset``, else ``[0, n]``.
    max_seqlen: longest document (int, so attention needs no host sync).
    pixel_values: ``(T, 3, S, S)`` tiles in the order of the pack's context tokens (uint8
        when every tile is uint8, else float), or None.
    num_valid: labels that are not IGNORE_INDEX (the cross-entropy denominator).
    sources: source of each sample, in order; names: their "file:line" names.
    skipped_media: "file: reason" for each sample skipped while building this pack.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    pixel_values: torch.Tensor | None
    num_valid: int
    sources: list[str]
    names: list[str] = field(default_factory=list)
    skipped_media: list[str] = field(default_factory=list)


def pack_samples(samples: Sequence[TokenizedSample], seq_len: int, *, reset: bool = True, pad_id: int = 0,
                 skipped_media: Sequence[str] = ()) -> Pack:
    """Lay ``samples`` (already at most ``seq_len`` tokens together) side by side and pad to ``seq_len``."""
    total = sum(len(s) for s in samples)
    if total > seq_len:
        raise ValueError(f"samples hold {total} tokens, more than seq_len={seq_len}")
    pad = seq_len - total
    ids = [s.input_ids for s in samples] + [torch.full((pad,), pad_id, dtype=torch.long)]
    labels = [s.labels for s in samples] + [torch.full((pad,), IGNORE_INDEX, dtype=torch.long)]
    lengths = [len(s) for s in samples if len(s)] + ([pad] if pad else [])
    if reset:
        position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
        cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    else:
        position_ids = torch.arange(seq_len, dtype=torch.long)
        lengths = [seq_len]
        cu = torch.tensor([0, seq_len], dtype=torch.int32)
    tiles = [s.pixel_values for s in samples if s.pixel_values is not None and s.pixel_values.shape[0]]
    if len({t.dtype for t in tiles}) > 1:
        tiles = [normalize(t) if t.dtype == torch.uint8 else t for t in tiles]
    label_t = torch.cat(labels)
    return Pack(
        input_ids=torch.cat(ids), labels=label_t, position_ids=position_ids, cu_seqlens=cu,
        max_seqlen=max(lengths, default=0), pixel_values=torch.cat(tiles) if tiles else None,
        num_valid=int((label_t != IGNORE_INDEX).sum()), sources=[s.source for s in samples],
        names=[s.name for s in samples], skipped_media=list(skipped_media),
    )


# --------------------------------------------------------------------------- mixtures


def stage_ratios(new: Sequence[str], previous: Sequence[str] = (), keep: float = 0.1) -> dict[str, float]:
    """Ratios for a stage that trains on ``new`` sources in full and replays ``keep`` of
    the previous stage's (Long-VITA's stage 3 keeps 0.1 of stage 2's data)."""
    ratios = {s: keep for s in previous}
    ratios.update({s: 1.0 for s in new})
    return ratios


class Mixture:
    """A deterministic, endless stream of samples drawn from named sources.

    sources: name -> samples. ratios: name -> share of that source used per epoch (1.0 =
    every sample once, 0.1 = a tenth, 2.5 = every sample twice plus half again; absent =
    1.0; 0 = unused). Epoch e takes ``round(ratio * len)`` samples of each source from
    its own seeded permutations and shuffles them together, all from ``(seed, e)``, so
    the order depends only on the seed. ``state_dict()`` is the position (epoch, index);
    ``load_state_dict`` continues from it exactly.

    ``shard(index, count)`` makes this stream the index-th of ``count`` strided views of it
    (samples index, index + count, ... of the endless sequence), so data-parallel groups
    read disjoint samples without drawing each other's."""

    def __init__(self, sources: Mapping[str, Sequence[Sample]], ratios: Mapping[str, float] | None = None, *,
                 seed: int = 0, shuffle: bool = True):
        ratios = dict(ratios or {})
        unknown = set(ratios) - set(sources)
        if unknown:
            raise ValueError(f"ratios name unknown source(s) {sorted(unknown)}; sources are {sorted(sources)}")
        for name, r in ratios.items():
            if not (r >= 0 and math.isfinite(r)):
                raise ValueError(f"ratio of source {name!r} must be a finite number >= 0, got {r}")
        self.sources = {k: list(v) for k, v in sources.items()}
        self.ratios = {k: float(ratios.get(k, 1.0)) for k in self.sources}
        if not any(round(self.ratios[k] * len(v)) for k, v in self.sources.items()):
            raise ValueError("the mixture selects no samples (every source is empty or has ratio 0)")
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.index = 0, 0
        self.stride = 1
        self._order: list[tuple[str, int]] | None = None

    def shard(self, index: int, count: int) -> "Mixture":
        """Read only every ``count``-th sample from the ``index``-th on (from the current
        position, which must be the start). Returns ``self``."""
        if not (isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count):
            raise ValueError(f"shard needs 0 <= index < count, got index={index!r}, count={count!r}")
        if (self.epoch, self.index) != (0, 0) or self.stride != 1:
            raise ValueError("shard() must be called once, before the first sample is drawn")
        self.stride = count
        self._advance(index)
        return self

    @classmethod
    def from_samples(cls, samples: Sequence[Sample], ratios: Mapping[str, float] | None = None, **kwargs) -> "Mixture":
        """Group ``samples`` by their ``source`` (e.g. one manifest holding several sources)."""
        sources: dict[str, list[Sample]] = {}
        for s in samples:
            sources.setdefault(s.source, []).append(s)
        return cls(sources, ratios, **kwargs)

    @classmethod
    def from_manifests(cls, manifests: Mapping[str, str | Path | Sequence[str | Path]],
                       ratios: Mapping[str, float] | None = None, **kwargs) -> "Mixture":
        """One source per name, read from one manifest or several (every sample's
        ``source`` set to that name)."""
        sources = {}
        for name, paths in manifests.items():
            paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
            sources[name] = [s for p in paths for s in read_manifest(p, source=name)]
        return cls(sources, ratios, **kwargs)

    def epoch_order(self, epoch: int) -> list[tuple[str, int]]:
        """(source, sample index) pairs of epoch ``epoch``, in order."""
        order = []
        for name in sorted(self.sources):
            n, count = len(self.sources[name]), round(self.ratios[name] * len(self.sources[name]))
            picks: list[int] = []
            rounds = 0
            while len(picks) < count:
                perm = list(range(n))
                if self.shuffle:
                    random.Random(f"{self.seed}:{epoch}:{name}:{rounds}").shuffle(perm)
                picks += perm
                rounds += 1
            order += [(name, i) for i in picks[:count]]
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def _current(self) -> list[tuple[str, int]]:
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        return self._order

    def samples_per_epoch(self) -> int:
        """Samples this stream reads in one pass over its sources (its strided share)."""
        return max(1, -(-len(self._current()) // self.stride))

    def _advance(self, steps: int) -> None:
        self.index += steps
        while self.index >= len(self._current()):
            self.index -= len(self._current())
            self.epoch, self._order = self.epoch + 1, None

    def next(self) -> Sample:
        """The sample at the current position; advances the position (by the stride)."""
        name, i = self._current()[self.index]
        self._advance(self.stride)
        return self.sources[name][i]

    def __iter__(self) -> Iterator[Sample]:
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "stride": self.stride}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this mixture has seed {self.seed}")
        if state.get("stride", self.stride) != self.stride:
            raise ValueError(f"data state was saved reading every {state['stride']}th sample, this mixture reads "
                             f"every {self.stride}th (resume with the same number of data-parallel groups)")
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


class PackStream:
    """Endless fixed-length packs from a Mixture (sequential packing, see module docstring).

    Each sample is tokenised when drawn; one whose media are missing or corrupt is skipped
    with a DataWarning naming the file and listed in the next pack's ``skipped_media``;
    one longer than ``seq_len`` is truncated (``truncate``). ``state_dict()`` is the
    mixture position of the first sample not yet in a returned pack, so a run restored
    from it yields exactly the packs it would have yielded."""

    def __init__(self, mixture: Mixture, tokenizer: Tokenizer, seq_len: int, media: MediaConfig, *,
                 reset: bool = True, special: SpecialTokens | None = None, pad_id: int | None = None,
                 max_skips: int = 1000):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.mixture, self.tokenizer, self.seq_len, self.media, self.reset = mixture, tokenizer, seq_len, media, reset
        self.special = special or SpecialTokens.from_tokenizer(tokenizer)
        self.pad_id = pad_id if pad_id is not None else (self.special.endoftext if self.special.endoftext is not None
                                                         else self.special.im_end)
        self.max_skips = max_skips
        self._pending: tuple[dict, TokenizedSample] | None = None  # drawn but not yet packed

    def _draw(self, skipped: list[str]) -> tuple[dict, TokenizedSample]:
        for _ in range(self.max_skips + 1):
            state = self.mixture.state_dict()
            sample = self.mixture.next()
            try:
                tok = tokenize_sample(sample, self.tokenizer, self.special, self.media)
            except InputError as exc:
                warnings.warn(f"skipping sample {sample.name!r}: {exc}", DataWarning, stacklevel=3)
                skipped.append(f"{sample.name}: {exc}")
                continue
            tok = truncate(tok, self.seq_len)
            if not int((tok.labels != IGNORE_INDEX).sum()):
                warnings.warn(f"skipping sample {sample.name!r}: no assistant token left to train on", DataWarning, stacklevel=3)
                continue
            return state, tok
        raise InputError(f"{self.max_skips} samples in a row could not be used (last skipped: {skipped[-1:]})")

    def next_pack(self) -> Pack:
        skipped: list[str] = []
        samples: list[TokenizedSample] = []
        used = 0
        while True:
            if self._pending is None:
                self._pending = self._draw(skipped)
            tok = self._pending[1]
            if samples and used + len(tok) > self.seq_len:
                break
            samples.append(tok)
            used += len(tok)
            self._pending = None
            if used == self.seq_len:
                break
            if len(samples) > self.mixture.samples_per_epoch():
                raise InputError(
                    f"--seq-len {self.seq_len}: one pack needs more than the whole data set ({len(samples) - 1} samples, "
                    f"{used - len(tok)} tokens in one pass); use a shorter --seq-len or more data")
        return pack_samples(samples, self.seq_len, reset=self.reset, pad_id=self.pad_id, skipped_media=skipped)

    def __iter__(self) -> Iterator[Pack]:
        while True:
            yield self.next_pack()

    def shard(self, index: int, count: int) -> "PackStream":
        """Pack only the index-th of ``count`` strided parts of the samples (``Mixture.shard``):
        each data-parallel group tokenises only its own packs. Returns ``self``."""
        if self._pending is not None:
            raise ValueError("shard() must be called before the first pack is drawn")
        self.mixture.shard(index, count)
        return self

    def state_dict(self) -> dict:
        return dict(self._pending[0]) if self._pending is not None else self.mixture.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.mixture.load_state_dict(state)
        self._pending = None


def pack_stream(manifest: str | Path, tokenizer: Tokenizer, special: SpecialTokens, media: MediaConfig, *,
                seq_len: int, reset: bool, seed: int = 0, in_order: bool = False) -> PackStream:
    """A ``PackStream`` over one manifest's samples (a source per sample ``source``).
    ``in_order``: the samples in the manifest's own order, every epoch (a manifest written
    as a curriculum, as the demo set is), instead of a seeded shuffle per epoch."""
    samples = read_manifest(manifest)
    if in_order:  # one source keeps the file's order (sources are otherwise laid out one after another)
        mixture = Mixture({"manifest": samples}, seed=seed, shuffle=False)
    else:
        mixture = Mixture.from_samples(samples, seed=seed)
    return PackStream(mixture, tokenizer, seq_len, media, reset=reset, special=special)
