"""How much GPU memory a run needs on each rank, before it runs: the model behind
``longvita plan`` and the ``pred_*`` columns of ``benchmarks/bench_prefill.py`` and
``bench_train.py``.

Every term is bytes per rank, counted from what the code keeps alive, not fitted:

- weights: every parameter in the run's dtype (bf16 for inference; fp32 masters in
  training), sharded over every rank under FSDP2 (training on more than one rank);
- gradients and AdamW's two moments: fp32, of the trainable parameters (by stage);
- the optimizer step's temporaries: torch's AdamW makes a square-root buffer per parameter
  (``foreach=False``, as the trainer runs it: the largest parameter's, twice during its
  division; ``foreach=True``, torch's default that ``bench_train.py`` uses: every trainable
  parameter's at once);
- the KV cache (inference): 2 x layers x KV heads x head_dim per token, this rank's share
  of the prompt plus the decoded tokens;
- activations: inference keeps one layer's working set at a time (the prompt, the shard,
  or one ``prefill_chunk``); training keeps what autograd saves per layer
  (``decoder_saved_bytes``: the tensors each op saves for its backward, which depend on
  whether the weights train, the precision and the decoder kernels) or, with activation
  checkpointing, each layer's input plus one layer recomputed, and a backward working set;
- the LM head: inference projects the last row only; training runs the fused chunked
  cross-entropy (``kernels/lm_head``), whose logits workspace is capped at 896 MiB;
- communication buffers: a ring step's K/V block sent and received (and the fp32 dK/dV
  travelling in the backward), the Ulysses all-to-all's input and output.

Checked against every peak measured on an H100 (``benchmarks/RESULTS.md``) by
``tests/test_capacity.py``, and the saved-tensor counts against autograd itself on the CPU.
The H100 measurements (2026-11-25) ran the decoder's eager RMSNorm/SwiGLU
(``decoder_kernels='eager'``); the fused kernels that replaced them
(``decoder_kernels='fused'``, the default) save less, a prediction no chip has checked yet.
Not modelled: the CUDA context and allocator fragmentation (leave 1-2 GiB), NCCL's own
buffers, and images' pixel arrays on the host.

Standard library and torch only; the model is built on the meta device to count its
parameters, so no weights are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["GIB", "MODES", "MemoryPlan", "ParamCounts", "decoder_saved_bytes", "generate_memory",
           "inference_layer_peak", "kv_bytes_per_token", "longest_fitting", "param_counts", "train_memory"]

GIB = 2**30
MODES = ("generate", "train")
PRECISIONS = ("bf16", "fp32")
DECODER_KERNELS = ("fused", "eager")
LCE_WORKSPACE_BYTES = 896 * 2**20  # kernels/lm_head/chunks.py TRITON_CHUNK_BYTES: the logits chunk cap


@dataclass
class MemoryPlan:
    """Per-rank memory of one run: ``items`` (name -> bytes), the ``phases`` in which
    each is alive (name -> item names), the peak over phases, and whether it fits."""

    mode: str
    tokens: int
    ranks: int
    gpu_bytes: float
    items: dict[str, float]
    phases: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def phase_bytes(self, phase: str) -> float:
        return sum(self.items[name] for name in self.phases[phase])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_bytes)

    @property
    def peak_bytes(self) -> float:
        return self.phase_bytes(self.peak_phase)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu_bytes

    def to_dict(self) -> dict:
        return {
            "mode": self.mode, "tokens": self.tokens, "ranks": self.ranks, "settings": self.settings,
            "gpu_gib": self.gpu_bytes / GIB,
            "items_gib": {k: v / GIB for k, v in self.items.items()},
            "phases_gib": {p: self.phase_bytes(p) / GIB for p in self.phases},
            "peak_phase": self.peak_phase, "peak_gib": self.peak_bytes / GIB, "fits": self.fits,
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------
# Parameters, counted on the meta device
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    vision: int
    projector: int
    embed: int
    layer: int  # one decoder layer
    layers: int  # every decoder layer
    final_norm: int
    lm_head: int
    largest: dict  # module -> its largest single parameter

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.embed + self.layers + self.final_norm + self.lm_head

    def trainable(self, vision: bool, projector: bool, llm: bool) -> int:
        return (self.vision * vision + self.projector * projector
                + (self.embed + self.layers + self.final_norm + self.lm_head) * llm)

    def largest_trainable(self, vision: bool, projector: bool, llm: bool) -> int:
        parts = [("vision", vision), ("projector", projector), ("llm", llm)]
        return max((self.largest[m] for m, on in parts if on), default=0)


def param_counts(cfg) -> ParamCounts:
    """Parameter counts of ``cfg``'s model, built on the meta device (no memory, no weights)."""
    import torch

    from longvita.model import LongVITA

    with torch.device("meta"):
        model = LongVITA(cfg)

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    def largest(*modules) -> int:
        return max(p.numel() for m in modules for p in m.parameters())

    text = model.text
    layer = count(text.layers[0]) if len(text.layers) else 0
    return ParamCounts(
        vision=count(model.vision), projector=count(model.projector), embed=count(text.embed_tokens),
        layer=layer, layers=count(text.layers), final_norm=count(text.norm),
        lm_head=0 if model.lm_head is None else count(model.lm_head),
        largest={"vision": largest(model.vision), "projector": largest(model.projector),
                 "llm": largest(text, *( [model.lm_head] if model.lm_head is not None else []))},
    )


# --------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------


def kv_heads_attended(num_kv_heads: int, ulysses: int) -> int:
    """KV heads whose K/V one rank's attention holds, times the Ulysses degree: with U
    larger than the KV heads each is replicated (``parallel/ulysses.py``), so a group
    carries U of them."""
    return max(num_kv_heads, ulysses)


def decoder_saved_bytes(cfg, *, precision: str = "bf16", trainable: bool = True, kernels: str = "fused",
                        ulysses: int = 1) -> dict[str, float]:
    """Bytes per token that autograd keeps for one decoder layer's backward, by part.

    ``precision='bf16'``: autocast over fp32 master weights (the residual stream fp32, every
    linear's input a bf16 cast of its own); ``'fp32'``: no casts. ``trainable``: the layer's
    weights train (linears save their inputs; frozen weights in a graph that still needs
    d(input) -- stage 1 trains the projector below the decoder -- save only what d(input)
    needs). ``kernels``: ``fused`` (``kernels.rms_norm`` saves its input and 1/rms,
    ``swiglu`` its two inputs) or ``eager`` (the plain-torch formulas: RMSNorm also keeps
    its fp32 normalised rows when its weight trains, SiLU-times-up three intermediates)."""
    t = cfg.text
    h, i, hq = t.hidden_size, t.intermediate_size, t.num_heads
    kvd = kv_heads_attended(t.num_kv_heads, ulysses) * t.head_dim
    c = 2 if precision == "bf16" else 4  # compute dtype
    r = 4  # residual stream: fp32 (fp32 masters under autocast, or fp32 throughout)
    cast = precision == "bf16"
    eager = kernels == "eager"
    parts = {
        # two RMSNorms: input (the residual rows) and 1/rms; eager + trainable weight: the normalised rows too
        "norms": 2 * (r * h + 4) + (2 * 4 * h if eager and trainable else 0),
        # q, k, v after RoPE, the output, the LSE (fp32); o_proj's input is the output itself
        "attention": c * 2 * h + c * 2 * kvd + 4 * hq,
        # SwiGLU: gate and up (fused), or silu's input, its output and up (eager)
        "mlp": c * (3 if eager else 2) * i,
    }
    if trainable:
        # linear inputs: under autocast each of q/k/v and gate/up casts the norm's rows for
        # itself (5 copies); in fp32 two norm outputs serve them; down_proj's input
        parts["linear inputs"] = (5 * c * h if cast else 2 * 4 * h) + c * i
    return parts


def mlp_saved_bytes(cfg, precision: str, trainable: bool, kernels: str) -> float:
    """The part of ``decoder_saved_bytes`` inside ``layer.mlp`` (what the ``mlp`` policy drops)."""
    t = cfg.text
    c = 2 if precision == "bf16" else 4
    inside = c * (3 if kernels == "eager" else 2) * t.intermediate_size
    if trainable:
        inside += (2 * c * t.hidden_size if precision == "bf16" else 0) + c * t.intermediate_size
    return inside


def vision_saved_bytes(cfg, precision: str = "bf16") -> float:
    """Bytes per vision token one trainable InternViT block saves: two LayerNorm inputs
    (fp32) and statistics, q/k/v casts, q/k/v/out, the layer scales' inputs, fc1's cast,
    GELU's input and output."""
    v = cfg.vision
    c = 2 if precision == "bf16" else 4
    return 2 * (4 * v.hidden_size + 8) + 10 * c * v.hidden_size + 2 * c * v.intermediate_size + 4 * v.num_heads


def inference_layer_peak(cfg, n: int, elem: int) -> float:
    """Activations alive at a decoder layer's peak for n tokens without autograd: the
    layer's input and the residual, the MLP's gate, up and their product, and RMSNorm's
    fp32 rows and squares (the eager formula's; the fused kernel keeps none, so this is an
    upper bound for it). Checked against H100 prefill peaks (``bench_prefill.py`` (a))."""
    t = cfg.text
    return n * (elem * (2 * t.hidden_size + 3 * t.intermediate_size) + 2 * 4 * t.hidden_size)


def local_tokens(tokens: int, cp: int) -> int:
    """Rows one rank of a CP group holds: the zigzag pads a document to a multiple of 2 x cp."""
    if cp <= 1:
        return tokens
    return -(-tokens // (2 * cp)) * 2


def ring_buffer_bytes(cfg, local: int, ring: int, elem: int, backward: bool, ulysses: int = 1) -> float:
    """A ring step's K/V block in flight: one received while one is sent (double buffer);
    in the backward the fp32 dK/dV accumulators travel with it."""
    if ring <= 1:
        return 0.0
    t = cfg.text
    kv = 2 * local * kv_heads_attended(t.num_kv_heads, ulysses) * t.head_dim  # K and V elements (all of this rank's heads)
    return 2 * kv * elem + (2 * kv * 4 if backward else 0)


def ulysses_buffer_bytes(cfg, local: int, ulysses: int, elem: int) -> float:
    """The all-to-all's send and receive buffers for q, k, v (KV heads replicated up to U)."""
    if ulysses <= 1:
        return 0.0
    t = cfg.text
    return 2 * local * (t.num_heads + 2 * kv_heads_attended(t.num_kv_heads, ulysses)) * t.head_dim * elem


# --------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------


def _check_common(tokens, gpus, cp, ulysses, gpu_gib):
    for name, v, lo in (("tokens", tokens, 1), ("gpus", gpus, 1), ("cp", cp, 1), ("ulysses", ulysses, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if gpus % cp:
        raise ValueError(f"cp {cp} must divide the number of GPUs ({gpus})")
    if cp % ulysses:
        raise ValueError(f"ulysses {ulysses} must divide cp {cp}")
    if not (isinstance(gpu_gib, (int, float)) and math.isfinite(gpu_gib) and gpu_gib > 0):
        raise ValueError(f"gpu_gib must be a positive number, got {gpu_gib!r}")


def kv_bytes_per_token(cfg, elem: int = 2) -> int:
    """KV-cache bytes of one token: K and V of every layer's KV heads."""
    t = cfg.text
    return 2 * t.num_layers * t.num_kv_heads * t.head_dim * elem


def generate_memory(cfg, tokens: int, *, gpus: int = 1, cp: int | None = None, ulysses: int = 1,
                    prefill_chunk: int | None = None, new_tokens: int = 16, tiles: int = 0,
                    gpu_gib: float = 80.0, dtype_bytes: int = 2, counts: ParamCounts | None = None) -> MemoryPlan:
    """Per-rank memory of ``longvita generate``: a ``tokens``-token prompt (``tiles`` image
    tiles among them), prefilled over a CP group of ``cp`` ranks (None: all ``gpus``;
    ``ulysses`` of them per all-to-all group) whole or ``prefill_chunk`` tokens per rank at
    a time, then ``new_tokens`` decoded. Weights in ``dtype_bytes`` (bf16: 2), whole on
    every rank."""
    cp = gpus if cp is None else cp
    _check_common(tokens, gpus, cp, ulysses, gpu_gib)
    if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be an int >= 1 or None, got {prefill_chunk!r}")
    counts = counts or param_counts(cfg)
    t, elem = cfg.text, dtype_bytes
    local = local_tokens(tokens, cp)
    step = min(local, prefill_chunk) if prefill_chunk else local
    items = {
        "weights": counts.total * elem,
        "KV cache": kv_bytes_per_token(cfg, elem) * (local + new_tokens),
        "activations": inference_layer_peak(cfg, step, elem),
        "LM head": t.vocab_size * 4 + t.hidden_size * elem,  # the last row's logits (fp32) and its hidden row
        "communication": ring_buffer_bytes(cfg, step, cp // ulysses, elem, False, ulysses)
                          + ulysses_buffer_bytes(cfg, step, ulysses, elem),
        "vision": _vision_inference_bytes(cfg, tiles, cp, elem),
    }
    phases = {
        "prefill": ["weights", "KV cache", "activations", "communication"],
        "vision encoding": ["weights", "KV cache", "vision"],
        "decode": ["weights", "KV cache", "LM head"],
    }
    notes = []
    if prefill_chunk is None and cp == 1 and tokens > 32768:
        notes.append("a whole-prompt prefill's activations grow with the prompt: --prefill-chunk 8192 bounds them")
    return MemoryPlan("generate", tokens, gpus, gpu_gib * GIB, items, phases, notes,
                      {"cp": cp, "ulysses": ulysses, "prefill_chunk": prefill_chunk, "new_tokens": new_tokens,
                       "tiles": tiles, "dtype_bytes": dtype_bytes})


def _vision_inference_bytes(cfg, tiles: int, cp: int, elem: int, tiles_per_chunk: int = 64) -> float:
    """Encoding this rank's tiles in chunks of ``tiles_per_chunk`` (``LocalPlan``'s
    default): one chunk's block working set, and the projected embeddings."""
    if tiles <= 0:
        return 0.0
    v = cfg.vision
    mine = -(-tiles // cp)
    rows = min(mine, tiles_per_chunk) * (v.num_patches + 1)
    block = rows * elem * (3 * v.hidden_size + v.intermediate_size)  # input, q/k/v, MLP hidden
    return block + mine * cfg.tokens_per_tile * cfg.text.hidden_size * elem


def train_memory(cfg, tokens: int, *, stage: int = 3, recipe_name: str = "paper", gpus: int = 1,
                 cp: int | None = None, ulysses: int = 1, activation_checkpointing: str = "auto",
                 precision: str = "bf16", tiles: int = 0, labelled: float = 1.0,
                 decoder_kernels: str = "fused", optimizer_foreach: bool = False, gpu_gib: float = 80.0,
                 counts: ParamCounts | None = None) -> MemoryPlan:
    """Per-rank memory of one training step of ``stage`` (``recipe_name``'s trainable
    modules) on a ``tokens``-token pack with ``tiles`` image tiles, ``labelled`` of its
    rows carrying a label, over ``gpus`` ranks in CP groups of ``cp`` (None: all) with
    ``ulysses`` per all-to-all group; FSDP2 shards over every rank when there is more than
    one rank (the trainer's rule). ``activation_checkpointing``: ``auto`` (the recipe's
    rule), or a policy of ``runtime.train.parallelize.AC_POLICIES``."""
    from longvita.runtime.train.parallelize import AC_POLICIES
    from longvita.runtime.train.recipe import LONG_SEQUENCE_AC, recipe

    cp = gpus if cp is None else cp
    _check_common(tokens, gpus, cp, ulysses, gpu_gib)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if decoder_kernels not in DECODER_KERNELS:
        raise ValueError(f"decoder_kernels must be one of {DECODER_KERNELS}, got {decoder_kernels!r}")
    if not (0 < labelled <= 1):
        raise ValueError(f"labelled must be in (0, 1], got {labelled!r}")
    r = recipe(stage, recipe_name)
    policy = activation_checkpointing
    if policy == "auto":
        policy = "full" if tokens >= LONG_SEQUENCE_AC else "none"
    if policy not in AC_POLICIES:
        raise ValueError(f"activation_checkpointing must be auto or one of {AC_POLICIES}, got {policy!r}")
    counts = counts or param_counts(cfg)
    t = cfg.text
    train = (r.train_vision, r.train_projector, r.train_llm)
    trainable = counts.trainable(*train)
    shards = gpus  # FSDP2 over every rank when there is more than one (parallel.ParallelDims.fsdp)
    c = 2 if precision == "bf16" else 4
    local = local_tokens(tokens, cp)
    llm_trains = r.train_llm

    # parameters, gradients, optimizer
    items = {
        "weights": counts.total * 4 / shards,
        "gradients": trainable * 4 / shards,
        "optimizer states": trainable * 8 / shards,
    }
    if optimizer_foreach:
        items["optimizer step"] = trainable * 4 / shards
    else:
        items["optimizer step"] = 2 * counts.largest_trainable(*train) * 4 / shards
    items["bf16 weights"] = items["frozen bf16 copies"] = 0.0
    if precision == "bf16":
        if shards > 1:  # FSDP2: the root (embeddings, head, projector) stays gathered in bf16,
            # plus the layer in compute and the one prefetched
            root = counts.embed + counts.lm_head + counts.projector + counts.final_norm
            items["bf16 weights"] = 2 * (root + 2 * counts.layer)
        else:
            # autocast's bf16 copies: every trainable weight a matmul uses is cast once and
            # cached until the forward ends (the embedding table is looked up, not cast); a
            # frozen weight is cast per use and kept by the layers that save it for d(input)
            items["bf16 weights"] = 2 * (trainable - (counts.embed if r.train_llm else 0))
            if not r.train_llm:
                kept_layers = {"none": t.num_layers, "mlp": t.num_layers, "every-other": t.num_layers // 2 + 1}
                items["frozen bf16 copies"] = 2 * kept_layers.get(policy, 1) * counts.layer

    # the decoder's activations on this rank's rows; layer 0's input is the embeddings
    saved = sum(decoder_saved_bytes(cfg, precision=precision, trainable=llm_trains, kernels=decoder_kernels,
                                    ulysses=ulysses).values())
    boundary = 4 * t.hidden_size  # a checkpointed layer keeps its fp32 input
    n_layers = t.num_layers
    if policy == "none":
        kept, recompute = n_layers * saved, 0.0
    elif policy == "full":
        kept, recompute = n_layers * boundary, saved
    elif policy == "every-other":
        ck = (n_layers + 1) // 2
        kept, recompute = ck * boundary + (n_layers - ck) * saved, saved
    else:  # mlp: each MLP keeps its input, one MLP is recomputed at a time
        inside = mlp_saved_bytes(cfg, precision, llm_trains, decoder_kernels)
        kept, recompute = n_layers * (saved - inside + 4 * t.hidden_size), inside
    items["activations"] = local * kept
    # the backward of the last layer: its recomputed tensors, the residual's gradient in and
    # out, and the MLP's three gradient buffers (dy, d gate, d up)
    items["backward working set"] = local * (recompute + 2 * 4 * t.hidden_size + 3 * c * t.intermediate_size)
    # the fused LM head's forward: the final rows (fp32) and their cast, one chunk of logits;
    # what it keeps for the backward: d(hidden), and d(weight) (fp32) when the head trains
    rows = max(1, int(local * labelled))
    items["LM head workspace"] = local * t.hidden_size * (4 + c) + min(rows * t.vocab_size * c, LCE_WORKSPACE_BYTES)
    items["LM head gradient"] = local * t.hidden_size * c + (counts.lm_head * 4 / shards if llm_trains else 0)
    items["communication"] = (ring_buffer_bytes(cfg, local, cp // ulysses, c, True, ulysses)
                              + ulysses_buffer_bytes(cfg, local, ulysses, c))
    items["vision"] = _vision_train_bytes(cfg, tiles, cp, precision, r.train_vision, policy)
    base = ["weights", "optimizer states"]
    phases = {
        "forward end": base + ["bf16 weights", "frozen bf16 copies", "activations", "LM head workspace",
                               "LM head gradient", "vision"],
        "backward start": base + ["frozen bf16 copies", "activations", "backward working set", "LM head gradient",
                                  "vision", "communication"],
        "backward end": base + ["gradients"],
        "optimizer step": base + ["gradients", "optimizer step"],
    }
    notes = [f"activation checkpointing: {policy}; decoder kernels: {decoder_kernels}; "
             f"parameters {'sharded over ' + str(shards) + ' ranks (FSDP2)' if shards > 1 else 'whole on every rank'}"]
    return MemoryPlan("train", tokens, gpus, gpu_gib * GIB, items, phases, notes,
                      {"stage": stage, "recipe": recipe_name, "cp": cp, "ulysses": ulysses,
                       "activation_checkpointing": policy, "precision": precision, "tiles": tiles,
                       "labelled": labelled, "decoder_kernels": decoder_kernels,
                       "optimizer_foreach": optimizer_foreach, "trainable": trainable})


def _vision_train_bytes(cfg, tiles: int, cp: int, precision: str, trains: bool, policy: str) -> float:
    """The vision tower of a training step on this rank's tiles: saved blocks when it trains
    (checkpointed blocks keep their fp32 input), else one block's working set; and the
    projector's input (the tower's output) and its embeddings."""
    if tiles <= 0:
        return 0.0
    v = cfg.vision
    c = 2 if precision == "bf16" else 4
    mine = -(-tiles // cp)
    rows = mine * (v.num_patches + 1)
    if trains:
        per = vision_saved_bytes(cfg, precision)
        if policy in ("full", "every-other"):
            ck = v.num_layers if policy == "full" else (v.num_layers + 1) // 2
            tower = rows * (ck * 4 * v.hidden_size + (v.num_layers - ck + 1) * per)
        else:
            tower = rows * v.num_layers * per
    else:
        tower = rows * c * (3 * v.hidden_size + v.intermediate_size)
    projector = rows * v.hidden_size * 4 * 2 + mine * cfg.tokens_per_tile * cfg.text.hidden_size * 4
    return tower + projector


def longest_fitting(plan_at, limit: int = 1 << 24, resolution: int = 1024) -> int:
    """The largest token count up to ``limit`` (a multiple of ``resolution``) whose plan
    ``plan_at(tokens)`` fits; 0 when not even ``resolution`` tokens do. Memory grows with
    the length in every term, so a bisection finds it."""
    lo, hi = 0, limit // resolution
    if plan_at(hi * resolution).fits:
        return hi * resolution
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if plan_at(mid * resolution).fits else (lo, mid)
    return lo * resolution
