"""What ``bench_prefill.py`` runs, apart from its four parts: settings, the memory
predictions (``longvita.runtime.capacity``), timing and the largest-prompt search, the
model and one setup per case (shared by the speed and memory runs and pytest-benchmark)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import free_memory, is_cuda_oom, sync  # noqa: E402

from longvita.model import LongVITA, preset  # noqa: E402
from longvita.runtime import LocalPlan, generate  # noqa: E402
from longvita.runtime.capacity import ParamCounts, generate_memory, inference_layer_peak, param_counts  # noqa: E402

HEADS = ("all-logits head", "chunked head", "last-token head")
DECODE_TOKENS = 16  # (b): the longest prompt must still decode this many
DECODE_TOKENS_C = 64  # (c): tokens timed for the decode speed
# the CPU smoke run widens the tiny preset's 512-token vocabulary so that, as with the real
# 152K one, the all-logits head is what runs out of memory first
CPU_VOCAB = 2048
GIB = 2**30


class SimulatedOOM(Exception):
    """CPU smoke runs: the analytic peak passed the simulated budget."""


def is_oom(e: BaseException) -> bool:
    """Out of memory: torch's allocator, cuBLAS failing to allocate its workspace, or the
    CPU run's simulated budget."""
    return isinstance(e, SimulatedOOM) or is_cuda_oom(e)


@dataclass
class Settings:
    device: str
    dtype: torch.dtype
    preset: str
    vocab_size: int | None  # None: the preset's
    layers: int
    lengths: list[int]  # (a) prefill lengths timed
    decode_lengths: list[int]  # (c)
    cp_lengths: list[int]  # (d)
    search_start: int
    search_limit: int
    resolution: int
    resolution_b: int  # (b)'s search: every try there prefills the whole prompt and decodes
    head_chunk: int
    prefill_chunk: int
    budget_bytes: float | None  # CPU: simulated memory; GPU: None (real OOM)
    iters: int
    b_tokens: int | None = None  # (b): one try at this length instead of the search

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"


def settings_from_args(args) -> Settings:
    cpu = args.cpu_smoke or not torch.cuda.is_available()
    if cpu:
        layers = args.layers or 2
        return Settings(
            device="cpu", dtype=torch.float32, preset="tiny", vocab_size=CPU_VOCAB, layers=layers,
            lengths=[128, 512], decode_lengths=[128, 512], cp_lengths=[512],
            search_start=64, search_limit=65536, resolution=32, resolution_b=256,
            head_chunk=128, prefill_chunk=128, budget_bytes=args.cpu_budget_mib * 2**20, iters=1,
            b_tokens=getattr(args, "b_tokens", None),
        )
    layers = args.layers or (4 if args.quick else 48)
    return Settings(
        device="cuda", dtype=torch.bfloat16, preset="long-vita-14b", vocab_size=None, layers=layers,
        lengths=[8192, 32768] if args.quick else [8192, 32768, 131072],
        decode_lengths=[32768] if args.quick else [32768, 131072],
        cp_lengths=args.cp_lengths or ([131072] if args.quick else [131072, 262144, 1048576]),
        # quick: few layers make every prompt fit, so the searches stop at 256K tokens
        search_start=args.search_start,
        search_limit=min(args.search_limit, 262144) if args.quick else args.search_limit,
        resolution=args.resolution * (4 if args.quick else 1),
        resolution_b=args.resolution * (4 if args.quick else 1),
        head_chunk=args.head_chunk, prefill_chunk=args.prefill_chunk, budget_bytes=None,
        iters=1 if args.quick else 3, b_tokens=getattr(args, "b_tokens", None),
    )



# --------------------------------------------------------------------------------------
# Memory predictions: longvita.runtime.capacity's model (what ``longvita plan`` prints),
# plus the two LM heads only this benchmark runs; the measurements are the truth
# --------------------------------------------------------------------------------------

_COUNTS: dict[str, ParamCounts] = {}


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _counts(cfg) -> ParamCounts:
    key = repr(cfg)
    if key not in _COUNTS:
        _COUNTS[key] = param_counts(cfg)
    return _COUNTS[key]


def prefill_peak(cfg, n: int, head: str, elem: int, head_chunk: int) -> float:
    """Peak activation bytes of a plain prefill of n tokens with ``head`` (weights excluded):
    the largest layer's working set (``capacity.inference_layer_peak``) or, at the head,
    the input embeddings (referenced until the forward returns), the final hidden states
    and the logits."""
    t = cfg.text
    if head == "all-logits head":
        logits = n * t.vocab_size * elem
    elif head == "chunked head":
        logits = min(n, head_chunk) * t.vocab_size * elem
    else:
        logits = t.vocab_size * 4
    at_head = 2 * n * t.hidden_size * elem + logits
    return max(inference_layer_peak(cfg, n, elem), at_head)


def generate_peak(cfg, n: int, elem: int, chunk: int) -> float:
    """Peak bytes (weights excluded) of a chunked prefill of n tokens then 16 decoded, as
    ``capacity.generate_memory`` plans ``longvita generate``: the preallocated KV cache
    plus one chunk's activations."""
    plan = generate_memory(cfg, n, prefill_chunk=chunk, new_tokens=DECODE_TOKENS, dtype_bytes=elem,
                           counts=_counts(cfg))
    return plan.peak_bytes - plan.items["weights"]


def largest_under(peak, budget: float, limit: int) -> int:
    """The largest n (up to ``limit``) with peak(n) <= budget: the model's prediction."""
    lo, hi = 0, limit
    if peak(hi) <= budget:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(mid) <= budget else (lo, mid)
    return lo


# --------------------------------------------------------------------------------------
# Timing, memory and the largest-prompt search (shared by the GPU and the CPU smoke run)
# --------------------------------------------------------------------------------------


def time_ms(fn, s: Settings, tokens: int = 0) -> float:
    """Median wall milliseconds of fn() (synchronised; a prefill is long enough that
    CUDA events add nothing). Kernels are compiled by ``warm_up`` beforehand, so runs past
    32K tokens (seconds each) are timed once without a warm-up run."""
    long = tokens > 32768
    for _ in range(0 if long else 1):
        fn()
    sync(s.device)
    times = []
    for _ in range(1 if long else s.iters):
        t0 = time.perf_counter()
        fn()
        sync(s.device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def time_and_peak(fn, s: Settings, tokens: int) -> tuple[float, float | None]:
    """(``time_ms`` of fn, peak GiB allocated above what was allocated before, None on the
    CPU): the peak is read over the timed runs themselves, so no extra run is needed."""
    if s.device != "cuda":
        return time_ms(fn, s, tokens), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = time_ms(fn, s, tokens)
    return ms, (torch.cuda.max_memory_allocated() - base) / GIB


def search_largest(fits, start: int, limit: int, resolution: int) -> int:
    """The largest n (to within ``resolution``, at most ``limit``) for which ``fits(n)``
    is True: double from ``start`` until a failure or ``limit``, then bisect the last gap
    (below ``start`` when ``start`` itself fails); 0 when nothing fits. ``fits`` is
    assumed monotone (true up to some n, false after)."""
    lo, n = 0, start
    while n <= limit and fits(n):
        lo, n = n, n * 2
    hi = n if n <= limit else limit + 1  # the first size known (or taken) not to fit
    while hi - lo > resolution:
        mid = (lo + hi) // 2 // resolution * resolution
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def attempt(fn, s: Settings, simulated_peak: float | None = None) -> bool:
    """Run fn(); False (memory freed) when it ran out of memory. On the CPU the run is
    refused before it starts when the analytic peak passes the simulated budget."""
    ok = False
    try:
        if s.budget_bytes is not None and simulated_peak is not None and simulated_peak > s.budget_bytes:
            raise SimulatedOOM(f"{simulated_peak / 2**20:.1f} MiB > budget")
        fn()
        sync(s.device)
        ok = True
    except Exception as e:
        if not is_oom(e):
            raise
    free_memory(s.device)  # here, after the handler: the exception's frames no longer hold tensors
    return ok


# --------------------------------------------------------------------------------------
# The model and one setup per case (shared by the speed and memory runs)
# --------------------------------------------------------------------------------------


def build_model(s: Settings) -> LongVITA:
    """Random weights made directly on the device in the benchmark dtype (no fp32 copy)."""
    cfg = preset(s.preset)
    cfg.text.num_layers = s.layers
    if s.vocab_size:
        cfg.text.vocab_size = s.vocab_size
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(s.dtype)
    try:
        with torch.device(s.device):
            model = LongVITA(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False)


def prompt(model: LongVITA, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, model.config.text.vocab_size, (n,), generator=g)
    return ids.to(model.lm_head.weight.device)


def setup_prefill(model: LongVITA, n: int, head: str, head_chunk: int):
    """fn() -> the last position's logits (1, V) after a plain prefill of n tokens."""
    ids = prompt(model, n)
    last = torch.tensor([n - 1], device=ids.device)

    @torch.inference_mode()
    def run():
        hidden = model(model.embed(ids))
        if head == "all-logits head":
            return model.logits(hidden)[-1:]
        if head == "last-token head":
            return model.logits(hidden, last)
        for start in range(0, n, head_chunk):  # every chunk's logits computed, only the last row kept
            logits = None  # the previous chunk's logits go before the next chunk's are made
            logits = model.lm_head(hidden[start : start + head_chunk])
        return logits[-1:]
    return run


def setup_generate(model: LongVITA, n: int, chunk: int, new_tokens: int = DECODE_TOKENS):
    """fn() -> (prefill seconds, decode tokens/s): chunked prefill of n tokens, then
    ``new_tokens`` greedy tokens from the KV cache."""
    ids = prompt(model, n)

    def run():
        t0 = time.perf_counter()
        stamps = []
        for _ in generate(model, ids, plan=LocalPlan(prefill_chunk=chunk), max_new_tokens=new_tokens):
            stamps.append(time.perf_counter())  # sampling reads the token: the device is in step
        decode_s = stamps[-1] - stamps[0]
        return stamps[0] - t0, (len(stamps) - 1) / decode_s if decode_s > 0 else float("nan")
    return run


def setup_attention(cfg, n: int, device: str, dtype: torch.dtype):
    """fn() running one layer's causal attention over n tokens (single GPU, P = 1)."""
    from longvita.kernels import varlen_attention

    t = cfg.text
    q = torch.randn(n, t.num_heads, t.head_dim, device=device, dtype=dtype)
    k = torch.randn(n, t.num_kv_heads, t.head_dim, device=device, dtype=dtype)
    v = torch.randn(n, t.num_kv_heads, t.head_dim, device=device, dtype=dtype)
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    return lambda: varlen_attention(q, k, v, cu, cu, n, n, causal=True)


def warm_up(model, s: Settings) -> None:
    """Compile and autotune the kernels on short inputs, so that no timed run pays for it."""
    n = min(1024, s.lengths[0])
    with torch.inference_mode():
        for head in HEADS:
            setup_prefill(model, n, head, n // 4)()
    setup_generate(model, n, n // 4, new_tokens=2)()
    sync(s.device)
    free_memory(s.device)
