"""A trainer for one Long-VITA stage: optimizer groups from a ``StageRecipe``, a warm-up +
cosine schedule, steps over a ``PackStream`` with context and data parallelism, atomic
checkpoints and exact resume.

Parallelism (world W ranks, ``cp`` dividing W): ranks in consecutive blocks of ``cp``
form context-parallel groups (each group computes one pack, zigzag-sharded, through
``packed_loss``); the ranks ``r, r+cp, ...`` form the data-parallel groups. With W > cp the
parameters are sharded by FSDP2 over every rank (``shard_model``) and gradients summed
through ``sum_gradients_loss``; with W == cp > 1 every rank holds the whole model and the
gradients are summed with ``all_reduce_gradients``. Every rank reads the same stream:
each step draws W/cp packs and data-parallel group g trains on pack g, so the data
position is the same on every rank.

Checkpoints (``OUT/checkpoints/step-NNNNNNN``): when the parameters are not sharded, rank
0 writes one ``state.pt`` (``torch.save`` of full state dicts: model, optimizer,
scheduler, data position, RNG, step); under FSDP2 every rank writes its shards with
``torch.distributed.checkpoint`` (and rank 0 a ``meta.pt`` with the rest). Either way the
files go to ``step-NNNNNNN.tmp`` first, which is renamed when complete, so a run killed
mid-write leaves the previous checkpoint as the newest complete one; the last ``keep``
are kept.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from longvita.train_recipe import CHECKPOINT_DIR, StageRecipe, latest_checkpoint, lr_factor
from longvita.dist.train import (
    all_reduce_gradients,
    apply_activation_checkpointing,
    packed_loss,
    shard_model,
    sum_gradients_loss,
)

__all__ = ["StepResult", "Trainer", "TrainingDiverged", "latest_checkpoint", "make_stream", "param_groups"]

class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the run stops before the optimizer step."""


@dataclass
class StepResult:
    step: int  # optimizer steps done (1 after the first)
    loss: float  # the global mean loss of the step's packs
    lr: float  # the LLM's (else the projector's) learning rate used in this step
    tokens: int  # pack tokens of the step, over every data-parallel group
    seconds: float
    skipped_media: list[str] = field(default_factory=list)
    grad_norm: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def param_groups(model, r: StageRecipe) -> list[dict]:
    """Optimizer groups of ``model`` for recipe ``r``; frozen modules get
    ``requires_grad_(False)`` and no group. Each group has a ``name``: ``vision.embed``,
    ``vision.layer{i}``, ``vision.rest``, ``projector``, ``llm``."""
    model.vision.requires_grad_(r.train_vision)
    model.projector.requires_grad_(r.train_projector)
    model.text.requires_grad_(r.train_llm)
    model.lm_head.requires_grad_(r.train_llm)
    groups: dict[str, dict] = {}

    def add(name, lr, p):
        if not p.requires_grad:
            return
        g = groups.setdefault(name, {"name": name, "lr": lr, "params": []})
        if any(q is p for q in g["params"]):
            return
        g["params"].append(p)

    seen: set[int] = set()
    n_layers = len(model.vision.layers)
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith("vision."):
            parts = name.split(".")
            if parts[1] == "layers":
                i = int(parts[2])
                add(f"vision.layer{i}", r.lr_vision * r.layer_decay ** (n_layers - 1 - i), p)
            elif parts[1] in ("patch_embed", "cls_token", "pos_embed"):
                add("vision.embed", r.lr_vision * r.layer_decay ** n_layers, p)
            else:
                add("vision.rest", r.lr_vision, p)
        elif name.startswith("projector."):
            add("projector", r.lr_projector, p)
        else:
            add("llm", r.lr_llm, p)
    out = list(groups.values())
    for g in out:
        g["weight_decay"] = r.weight_decay
    return out


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Train ``model`` for ``steps`` optimizer steps of recipe ``recipe`` on ``stream``.

    model: a ``LongVITA`` (the same initial weights on every rank); tokenizer: saved with
    the final model. stream: a ``PackStream`` (the same on every rank). cp: ranks per
    context-parallel group (must divide the world size). out: the run folder
    (checkpoints, ``final``). checkpoint_every: steps between checkpoints (0: only at the
    end); keep: complete checkpoints kept.

    ``run()`` yields one ``StepResult`` per step; ``resume()`` first restores the newest
    complete checkpoint under ``out``; ``save_final()`` writes ``out/final``."""

    def __init__(self, model, tokenizer, recipe: StageRecipe, stream, *, steps: int, out: str | os.PathLike,
                 cp: int = 1, checkpoint_every: int = 0, keep: int = 2, seed: int = 0,
                 activation_checkpointing: bool = False, mixed_precision: str | None = None):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.recipe, self.stream, self.tokenizer = recipe.validate(), stream, tokenizer
        self.steps, self.out, self.keep = steps, Path(out), keep
        self.checkpoint_every, self.seed = checkpoint_every, seed
        self.rank, self.world = _world()
        if cp < 1 or self.world % cp:
            raise ValueError(f"cp ({cp}) must divide the number of processes ({self.world})")
        self.cp, self.dp = cp, self.world // cp
        self.cp_group = self.dp_group = None
        self.mesh = None
        if self.world > 1:
            # every rank creates every group in the same order (torch.distributed's rule)
            cp_groups = [dist.new_group(list(range(g * cp, (g + 1) * cp))) for g in range(self.dp)]
            dp_groups = [dist.new_group(list(range(r, self.world, cp))) for r in range(cp)]
            self.cp_group, self.dp_group = cp_groups[self.rank // cp], dp_groups[self.rank % cp]
        self.dp_index = self.rank // cp
        self.config = model.config
        groups = param_groups(model, self.recipe)  # requires_grad set before sharding
        if mixed_precision not in (None, "bf16"):
            raise ValueError(f"mixed_precision must be None or 'bf16', got {mixed_precision!r}")
        # bf16 compute over fp32 master weights: FSDP2 casts the gathered parameters (and
        # reduces gradients in fp32); without FSDP, autocast does the casting per op
        self.mixed_precision = mixed_precision
        if activation_checkpointing:  # before FSDP, as torchtitan orders them
            apply_activation_checkpointing(model)
        if self.dp > 1:
            from torch.distributed.device_mesh import init_device_mesh

            device = next(model.parameters()).device.type
            self.mesh = init_device_mesh(device, (self.world,))
            mp_policy = None
            if mixed_precision == "bf16":
                from torch.distributed.fsdp import MixedPrecisionPolicy

                mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            model = shard_model(model, self.mesh, mp_policy=mp_policy)
            groups = param_groups(model, self.recipe)  # the sharded (DTensor) parameters
        self.model = model.train()
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(
            groups, betas=(self.recipe.beta1, self.recipe.beta2), eps=self.recipe.eps,
            weight_decay=self.recipe.weight_decay, foreach=False,
        )
        warmup, total, floor = self.recipe.warmup(steps), steps, self.recipe.min_lr_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, warmup, floor))
        self.step = 0

    # ------------------------------------------------------------------ steps
    @property
    def sharded(self) -> bool:
        return self.mesh is not None

    def _next_packs(self):
        packs = [self.stream.next_pack() for _ in range(self.dp)]
        return packs[self.dp_index], packs

    def _dummy_tile(self, pack):
        """``pack`` plus one more document: one black tile's context tokens, no labels. Its
        loss and gradients are those of ``pack`` exactly (a separate document without
        labels), but the vision tower runs, so every rank of a sharded model takes part in
        the vision blocks' collectives when another data-parallel group's pack has media."""
        import dataclasses

        tpt, size = self.config.tokens_per_tile, self.config.vision.image_size
        slot = self.config.image_token_ids[0]
        n = int(pack.input_ids.numel())
        return dataclasses.replace(
            pack,
            input_ids=torch.cat([pack.input_ids, torch.full((tpt,), slot, dtype=pack.input_ids.dtype)]),
            labels=torch.cat([pack.labels, torch.full((tpt,), -100, dtype=pack.labels.dtype)]),
            position_ids=torch.cat([pack.position_ids, torch.arange(tpt, dtype=pack.position_ids.dtype)]),
            cu_seqlens=torch.cat([pack.cu_seqlens, torch.tensor([n + tpt], dtype=pack.cu_seqlens.dtype)]),
            pixel_values=torch.zeros(1, 3, size, size, dtype=torch.uint8),
        )

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        pack, packs = self._next_packs()
        if self.sharded and pack.pixel_values is None and any(p.pixel_values is not None for p in packs):
            pack = self._dummy_tile(pack)
        device = next(self.model.parameters()).device
        pixels = pack.pixel_values
        autocast = self.mixed_precision == "bf16" and not self.sharded
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = packed_loss(
                self.model, pack.input_ids.to(device), pack.labels.to(device),
                None if pixels is None else pixels.to(device),
                cu_seqlens=pack.cu_seqlens.to(device), position_ids=pack.position_ids.to(device),
                cp_group=self.cp_group, dp_group=self.dp_group,
            )
        report = loss.detach().clone().double()
        if self.world > 1:
            dist.all_reduce(report)  # the shares of every rank add up to the global mean
        value = float(report)
        if not math.isfinite(value):
            last = latest_checkpoint(self.out)
            raise TrainingDiverged(
                f"step {self.step + 1}: the loss is {value}; stopped before the optimizer step "
                f"(last good checkpoint: {last if last else 'none'})")
        if loss.requires_grad:  # not when only the projector trains and the pack has no media
            (sum_gradients_loss(loss, self.mesh) if self.sharded else loss).backward()
        if not self.sharded and self.world > 1:
            all_reduce_gradients(self.model, self.cp_group)
        grad_norm = None
        if self.recipe.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.recipe.grad_clip, foreach=False))
        lr = self._report_lr()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        skipped = [s for p in packs for s in p.skipped_media]
        return StepResult(self.step, value, lr, sum(int(p.input_ids.numel()) for p in packs),
                          time.perf_counter() - t0, skipped, grad_norm)

    def _report_lr(self) -> float:
        by_name = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        for name in ("llm", "projector"):
            if name in by_name:
                return by_name[name]
        return max(by_name.values())

    def run(self, on_checkpoint: Callable[[Path], None] | None = None) -> Iterator[StepResult]:
        """Yield a StepResult per step until ``steps``; checkpoint every
        ``checkpoint_every`` steps and at the end."""
        while self.step < self.steps:
            result = self.train_step()
            yield result
            if (self.checkpoint_every and self.step % self.checkpoint_every == 0) or self.step == self.steps:
                path = self.save_checkpoint()
                if on_checkpoint is not None:
                    on_checkpoint(path)

    # ------------------------------------------------------------------ checkpoints
    def _rng_state(self) -> dict:
        import numpy as np

        state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _set_rng_state(self, state: dict) -> None:
        import numpy as np

        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def _meta(self) -> dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "data": self.stream.state_dict(),
                "rng": self._rng_state(), "recipe": self.recipe.to_dict(), "world": self.world, "cp": self.cp,
                "steps": self.steps}

    def _rename(self, tmp: Path, final: Path) -> None:
        os.replace(tmp, final)

    def save_checkpoint(self) -> Path:
        """Write ``out/checkpoints/step-NNNNNNN`` atomically (temp folder, then rename) and
        drop all but the newest ``keep``. Returns the folder."""
        root = self.out / CHECKPOINT_DIR
        final = root / f"step-{self.step:07d}"
        tmp = root / f"step-{self.step:07d}.tmp"
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self._barrier()
        if self.sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
            if self.rank == 0:
                torch.save(self._meta(), tmp / "meta.pt")
        elif self.rank == 0:
            state = self._meta()
            state["model"] = self.model.state_dict()
            state["optimizer"] = self.optimizer.state_dict()
            torch.save(state, tmp / "state.pt")
        self._barrier()
        if self.rank == 0:
            (tmp / "COMPLETE").write_text(f"{self.step}\n")
            if final.exists():  # a re-run of the same step: the new one replaces it
                shutil.rmtree(final)
            self._rename(tmp, final)
            done = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp")
                          and p.name.startswith("step-"))
            for old in done[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not (path / "COMPLETE").exists():
            raise FileNotFoundError(f"{path}: not a complete checkpoint")
        if (path / "dcp").is_dir():
            if not self.sharded:
                raise ValueError(f"{path}: a sharded (FSDP) checkpoint; resume it with the same ranks and --cp")
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            state = {"model": model_sd, "optimizer": optim_sd}
            dcp.load(state, checkpoint_id=str(path / "dcp"))
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])
            meta = torch.load(path / "meta.pt", weights_only=False)
        else:
            if self.sharded:
                raise ValueError(f"{path}: an unsharded checkpoint; resume it with the same ranks and --cp")
            meta = torch.load(path / "state.pt", weights_only=False, map_location="cpu")
            self.model.load_state_dict(meta["model"])
            self.optimizer.load_state_dict(meta["optimizer"])
        if (meta["world"], meta["cp"]) != (self.world, self.cp):
            raise ValueError(f"{path}: written by {meta['world']} ranks with cp {meta['cp']}; resume with the same "
                             f"(here: {self.world} ranks, cp {self.cp})")
        if meta["steps"] != self.steps:
            # the schedule is a function of the total: a different total would change it
            raise ValueError(f"{path}: the run was started with {meta['steps']} steps, not {self.steps} "
                             f"(the cosine schedule depends on the total)")
        self.scheduler.load_state_dict(meta["scheduler"])
        self.stream.load_state_dict(meta["data"])
        self._set_rng_state(meta["rng"])
        self.step = int(meta["step"])

    def resume(self) -> Path | None:
        """Restore the newest complete checkpoint under ``out`` (None when there is none)."""
        path = latest_checkpoint(self.out)
        if path is not None:
            self.load_checkpoint(path)
        return path

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ------------------------------------------------------------------ final model
    def save_final(self, folder: str | os.PathLike | None = None) -> Path:
        """``save_pretrained`` of the trained model (with the tokenizer) to ``out/final``;
        under FSDP the full state dict is gathered first. Rank 0 writes."""
        folder = Path(folder) if folder is not None else self.out / "final"
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            from longvita.model import LongVITA

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.rank == 0:
                plain = LongVITA(self.config)
                plain.load_state_dict(full)
                plain.save_pretrained(str(folder), tokenizer=self.tokenizer)
        elif self.rank == 0:
            self.model.save_pretrained(str(folder), tokenizer=self.tokenizer)
        self._barrier()
        return folder


def make_stream(manifest: str | os.PathLike, tokenizer, special, config, *, seq_len: int, reset: bool, seed: int = 0,
                in_order: bool = False):
    """A ``PackStream`` over one manifest's samples (one source per sample ``source``),
    tiled and tokenised the way ``config`` (a model's ``LongVITAConfig``) expects.
    ``in_order``: the samples in the manifest's own order, every epoch (a manifest written
    as a curriculum, as the demo set is), instead of a seeded shuffle per epoch."""
    from longvita.data.training import MediaConfig, Mixture, PackStream, read_manifest

    media = MediaConfig(tokens_per_tile=config.tokens_per_tile, image_size=config.vision.image_size,
                        preprocess=config.preprocess)
    samples = read_manifest(manifest)
    if in_order:  # one source keeps the file's order (sources are otherwise laid out one after another)
        mixture = Mixture({"manifest": samples}, seed=seed, shuffle=False)
    else:
        mixture = Mixture.from_samples(samples, seed=seed)
    return PackStream(mixture, tokenizer, seq_len, media, reset=reset, special=special)
