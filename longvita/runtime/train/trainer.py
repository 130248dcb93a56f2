"""A trainer for one Long-VITA stage, assembled from parts: the parallel degrees and their
mesh (``parallel.ParallelDims``), the optimizer groups of a ``StageRecipe``
(``param_groups``), the model's training module (``parallelize``: activation
checkpointing, FSDP2), the packed loss (``loss``), and the checkpoints
(``CheckpointManager``). The trainer itself only steps.

Parallelism (world W ranks, ``cp`` dividing W): ranks in consecutive blocks of ``cp``
form context-parallel groups (each group computes one pack, zigzag-sharded); the ranks
``r, r+cp, ...`` form the data-parallel groups. Each data-parallel group reads its own
strided part of the data (``PackStream.shard``), so a rank tokenises only its own packs.
With W > 1 the parameters are sharded by FSDP2 over every rank (context-parallel ranks
included: the weights and optimizer state of a 14B model fit no GPU whole) and gradients
summed through ``sum_gradients_loss``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from longvita.common import LongVITAError
from longvita.parallel import ParallelDims, check_ulysses_heads, rank_world
from longvita.runtime.train.checkpoint import CheckpointManager, latest_checkpoint
from longvita.runtime.train.loss import packed_loss
from longvita.runtime.train.parallelize import parallelize, sum_gradients_loss
from longvita.runtime.train.recipe import StageRecipe, lr_factor

__all__ = ["StepResult", "Trainer", "TrainingDiverged", "param_groups"]


class TrainingDiverged(LongVITAError, RuntimeError):
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
    n_layers = len(model.vision.layers)
    for name, p in model.named_parameters():  # shared (tied) parameters come once
        if not p.requires_grad:
            continue
        parts = name.split(".")
        if parts[0] == "vision" and parts[1] == "layers":
            i = int(parts[2])
            key, lr = f"vision.layer{i}", r.lr_vision * r.layer_decay ** (n_layers - 1 - i)
        elif parts[0] == "vision" and parts[1] in ("patch_embed", "cls_token", "pos_embed"):
            key, lr = "vision.embed", r.lr_vision * r.layer_decay ** n_layers
        elif parts[0] == "vision":
            key, lr = "vision.rest", r.lr_vision
        elif parts[0] == "projector":
            key, lr = "projector", r.lr_projector
        else:
            key, lr = "llm", r.lr_llm
        groups.setdefault(key, {"name": key, "lr": lr, "params": [], "weight_decay": r.weight_decay})["params"].append(p)
    return list(groups.values())


class Trainer:
    """Train ``model`` for ``steps`` optimizer steps of recipe ``recipe`` on ``stream``.

    model: a ``LongVITA`` (the same initial weights on every rank); tokenizer: saved with
    the final model. stream: a ``PackStream`` over the whole data (the same on every rank:
    the trainer shards it per data-parallel group). cp: ranks per context-parallel group
    (must divide the world size; None: all of them); ulysses: the Ulysses degree inside it
    (must divide cp; 1: a plain ring). activation_checkpointing: a policy of
    ``parallelize.AC_POLICIES`` (True: ``full``). out: the run folder (checkpoints,
    ``final``). checkpoint_every: steps between checkpoints (0: only at the end); keep:
    complete checkpoints kept.

    ``run()`` yields one ``StepResult`` per step; ``resume()`` first restores the newest
    complete checkpoint under ``out`` that verifies; ``save_final()`` writes ``out/final``."""

    def __init__(self, model, tokenizer, recipe: StageRecipe, stream, *, steps: int, out: str | os.PathLike,
                 cp: int | None = None, ulysses: int = 1, checkpoint_every: int = 0, keep: int = 2,
                 activation_checkpointing: bool | str = False, mixed_precision: str | None = None):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.recipe, self.stream, self.tokenizer = recipe.validate(), stream, tokenizer
        self.steps, self.out, self.checkpoint_every = steps, Path(out), checkpoint_every
        self.rank, world = rank_world()
        self.dims = ParallelDims.of(world, cp, ulysses)
        check_ulysses_heads(ulysses, model.config.text.num_heads, model.config.text.num_kv_heads)
        device = next(model.parameters()).device
        self.mesh = self.dims.build(device.type)
        if self.dims.dp > 1:  # each data-parallel group packs its own strided part of the data
            stream.shard(self.mesh.dp_index, self.dims.dp)
        self.model, self.config = model, model.config
        param_groups(model, self.recipe)  # requires_grad set before sharding: FSDP2 reads it
        self.mixed_precision = mixed_precision
        self.module = parallelize(model, self.mesh.fsdp, activation_checkpointing=activation_checkpointing,
                                  mixed_precision=mixed_precision).train()
        groups = param_groups(model, self.recipe)  # the parameters as sharded (DTensors under FSDP2)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(
            groups, betas=(self.recipe.beta1, self.recipe.beta2), eps=self.recipe.eps,
            weight_decay=self.recipe.weight_decay, foreach=False,
        )
        warmup, floor = self.recipe.warmup(steps), self.recipe.min_lr_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, steps, warmup, floor))
        self.checkpoints = CheckpointManager(
            self.out, model=self.module, optimizer=self.optimizer, scheduler=self.scheduler,
            stream_state=stream.state_dict, load_stream_state=stream.load_state_dict, sharded=self.sharded, keep=keep,
            run={"world": world, "cp": self.dims.cp, "ulysses": self.dims.ulysses, "steps": steps,
                 "recipe": self.recipe.to_dict()},
        )
        self.step = 0

    @property
    def sharded(self) -> bool:
        return self.mesh.fsdp is not None

    # ------------------------------------------------------------------ steps
    def _touch_vision(self, pack, device) -> bool:
        """The vision rule (``runtime.train.loss``): every rank runs the vision tower when
        any rank of the step has media. Packs are shared within a CP group; across
        data-parallel groups under FSDP2 one flag is reduced."""
        if self.dims.world == 1:
            return False
        has = torch.tensor([pack.pixel_values is not None], dtype=torch.int32, device=device)
        if self.dims.dp > 1:
            dist.all_reduce(has, op=dist.ReduceOp.MAX)
        return bool(has)

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        pack = self.stream.next_pack()
        device = next(self.model.parameters()).device
        touch_vision = self._touch_vision(pack, device)
        pixels = None if pack.pixel_values is None else pack.pixel_values.to(device)
        autocast = self.mixed_precision == "bf16" and not self.sharded  # FSDP2 casts the parameters itself
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = packed_loss(
                self.module, pack.input_ids.to(device), pack.labels.to(device), pixels,
                cu_seqlens=pack.cu_seqlens.to(device), position_ids=pack.position_ids.to(device),
                max_seqlen=pack.max_seqlen, cp_group=self.mesh.cp, dp_group=self.mesh.dp_group,
                touch_vision=touch_vision, label_smoothing=self.recipe.label_smoothing, z_loss=self.recipe.z_loss,
            )
        report = loss.detach().clone().double()
        if self.dims.world > 1:
            dist.all_reduce(report)  # the shares of every rank add up to the global mean
        value = float(report)
        if not math.isfinite(value):
            last = latest_checkpoint(self.out)
            raise TrainingDiverged(
                f"step {self.step + 1}: the loss is {value}; stopped before the optimizer step "
                f"(last good checkpoint: {last if last else 'none'})")
        if loss.requires_grad:  # not when only the projector trains and no rank has media
            (sum_gradients_loss(loss, self.mesh.fsdp) if self.sharded else loss).backward()
        grad_norm = None
        if self.recipe.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.recipe.grad_clip, foreach=False))
        lr = self._report_lr()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        known = self.config.trained_length
        if known is not None and known < self.recipe.seq_len:  # unknown (None) stays unknown
            self.config.trained_length = self.recipe.seq_len
        skipped = list(pack.skipped_media)
        if self.dims.dp > 1:  # one rank of each data-parallel group reports its pack's skips
            everyone = [None] * self.dims.world
            dist.all_gather_object(everyone, skipped if self.rank % self.dims.cp == 0 else [])
            skipped = [s for part in everyone for s in part]
        return StepResult(self.step, value, lr, int(pack.input_ids.numel()) * self.dims.dp,
                          time.perf_counter() - t0, skipped, grad_norm)

    def _report_lr(self) -> float:
        by_name = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        for name in ("llm", "projector"):
            if name in by_name:
                return by_name[name]
        return max(by_name.values())

    def run(self) -> Iterator[StepResult]:
        """Yield a StepResult per step until ``steps``; checkpoint every
        ``checkpoint_every`` steps and at the end."""
        while self.step < self.steps:
            result = self.train_step()
            yield result
            if (self.checkpoint_every and self.step % self.checkpoint_every == 0) or self.step == self.steps:
                self.checkpoints.save(self.step)

    # ------------------------------------------------------------------ checkpoints
    def resume(self, on_fallback=None) -> Path | None:
        """Restore the newest complete checkpoint under ``out`` that verifies (None when
        there is none; see ``CheckpointManager.resume``)."""
        path = self.checkpoints.resume(on_fallback)
        if path is not None:
            self.step = self.checkpoints.restored_step
        return path

    def save_final(self, folder: str | os.PathLike | None = None) -> Path:
        """``save_pretrained`` of the trained model (with the tokenizer) to ``out/final``;
        under FSDP the full state dict is gathered first. Rank 0 writes."""
        folder = Path(folder) if folder is not None else self.out / "final"
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            from longvita.model import LongVITA

            # the FSDP root is the PackedLoss around the model: its keys carry "model."
            full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.rank == 0:
                plain = LongVITA(self.config)
                plain.load_state_dict({k.removeprefix("model."): v for k, v in full.items()})
                plain.save_pretrained(str(folder), tokenizer=self.tokenizer)
        elif self.rank == 0:
            self.model.save_pretrained(str(folder), tokenizer=self.tokenizer)
        if self.dims.world > 1:
            dist.barrier()
        return folder
