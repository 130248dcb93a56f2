"""The selectable variants of the varlen attention kernels (``kernels/attention/launch_table.py``):
each one exact against the float64 reference in the interpreter (fp32) and within 2x of plain
torch in fp16, with the existing test method (``test_varlen_attention.py``'s helpers); the
sorted work list; TMA's fallback; how a variant is chosen and how the launch table is read.
Every variant runs here: Triton's interpreter executes tensor descriptors and ignores warp
specialisation (the compile report checks what each compiles to for sm_90a)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from longvita.kernels import reference as ref
from longvita.kernels._backend import triton_runs_on
from longvita.kernels.attention import launch_table as lt
from longvita.kernels.attention import varlen_attention_bwd, varlen_attention_fwd

from test_varlen_attention import _check_fp32, _inputs, _lowp_reference, _max_abs, _max_err, _run_float64, _run_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_runs_on(DEVICE), reason="Triton cannot run here")

VARIANTS = ["tma", "sorted", "persistent", "ws", "fused_bwd", "budget", "tma+persistent+fused_bwd",
            "tma+sorted+ws+budget"]
if DEVICE.type == "cuda":  # 'ws' is refused on GPUs (test_ws_refused_on_gpu_before_launch)
    VARIANTS = [v for v in VARIANTS if "ws" not in v.split("+")]
LENS = [0, 1, 17, 5, 0, 37]


@pytest.fixture
def variant_env(monkeypatch):
    def use(name):
        monkeypatch.setenv(lt.ENV, name)
    return use


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_fp32_matches_float64(variant, causal, variant_env):
    variant_env(variant)
    _check_fp32(LENS, LENS, 5, 1, 32, causal)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_unequal_lengths_windows_and_padded_head_dim(variant, variant_env):
    """Queries without keys, bottom-right causal rows that see nothing, a window, D = 80
    (padded to 128: descriptors zero-fill the columns past 80)."""
    variant_env(variant)
    _check_fp32([3, 1, 17, 0, 37, 7], [2, 0, 23, 6, 33, 19], 4, 2, 16, True)
    _check_fp32([0, 1, 37, 5], [0, 1, 37, 21], 2, 2, 80, False, (11, 4))


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_fp16_error_at_most_twice_torch(variant, variant_env):
    variant_env(variant)
    lens, hq, hkv, d, causal, window = [0, 1, 29, 0, 46], 4, 2, 64, True, (-1, -1)
    q, k, v, cu_q, cu_k, mq, mk = _inputs(lens, lens, hq, hkv, d, torch.float16)
    dout = torch.randn_like(q)
    dlse = torch.randn(hq, q.shape[0], device=DEVICE)
    out, lse, grads = _run_triton(q, k, v, cu_q, cu_k, mq, mk, causal, window, dout, dlse)
    r_out, r_lse, r_grads = _run_float64(q, k, v, cu_q, cu_k, causal, window, dout, dlse, d**-0.5)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    p_out, p_lse = _lowp_reference(*leaves, cu_q, cu_k, d**-0.5, causal, window)
    p_grads = torch.autograd.grad((p_out, p_lse), leaves, (dout, dlse.half()))
    named = [("out", out, p_out, r_out), ("lse", lse, p_lse, r_lse)]
    named += list(zip(("dq", "dk", "dv"), grads, p_grads, r_grads))
    for name, a, p, b in named:
        assert a.dtype == (torch.float32 if name == "lse" else torch.float16), name
        err, base = _max_err(a, b), _max_err(p, b)
        assert err <= 2 * base + 1e-5 * _max_abs(b), f"{name}: {err:.3g} > 2 x {base:.3g}"


@pytest.mark.parametrize("variant", ["tma", "sorted", "persistent", "fused_bwd", "tma+persistent+fused_bwd"])
def test_variant_rows_past_end_and_poisoned_buffers(variant, variant_env, monkeypatch):
    """NaN inputs past cu_seqlens[-1] (TMA's per-document descriptors must not read them,
    the work lists must not visit them); output buffers start as NaN so every row inside a
    document must be written (the fused backward's dQ accumulator is zeroed by design)."""
    variant_env(variant)
    lens_q, lens_k = [0, 1, 17, 5, 0, 37], [0, 1, 0, 5, 3, 30]
    hq, d = 4, 32
    q, k, v, cu_q, cu_k, mq, mk = _inputs(lens_q, lens_k, hq, 2, d, torch.float32, extra_q=5, extra_k=3)
    nq, nk = sum(lens_q), sum(lens_k)
    for t, n in ((q, nq), (k, nk), (v, nk)):
        t[n:] = math.nan
    dout = torch.randn_like(q)
    dout[nq:] = math.nan
    dlse = torch.randn(hq, q.shape[0], device=DEVICE)
    r_out, r_lse, r_grads = _run_float64(q[:nq], k[:nk], v[:nk], cu_q, cu_k, True, (-1, -1), dout[:nq],
                                         dlse[:, :nq], d**-0.5)
    real_zeros_like, real_full = torch.zeros_like, torch.full
    monkeypatch.setattr(torch, "zeros_like", lambda t, **kw: real_full(t.shape, math.nan, dtype=t.dtype, device=t.device)
                        if t.is_floating_point() else real_zeros_like(t, **kw))
    monkeypatch.setattr(torch, "full", lambda shape, value, **kw: real_full(shape, math.nan, **kw))
    out, lse = varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, causal=True, backend="triton")
    dq, dk, dv = varlen_attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, mq, mk, causal=True, dlse=dlse,
                                      backend="triton")
    monkeypatch.setattr(torch, "zeros_like", real_zeros_like)
    monkeypatch.setattr(torch, "full", real_full)
    for name, a, b in (("out", out[:nq], r_out), ("lse", lse[:, :nq], r_lse), ("dq", dq[:nq], r_grads[0]),
                       ("dk", dk[:nk], r_grads[1]), ("dv", dv[:nk], r_grads[2])):
        assert not torch.isnan(a).any(), f"{name}: a row inside a document was never written (or read NaN)"
        assert _max_err(a, b) / _max_abs(b) < 1e-5, name


@pytest.mark.parametrize("variant", ["sorted", "persistent", "fused_bwd"])
@pytest.mark.parametrize("bm,bn", [(32, 16), (16, 32)])
def test_variant_unequal_block_sizes(monkeypatch, variant, bm, bn, variant_env):
    """The work lists are built per block size, and the fused backward's q blocks differ
    from its key blocks: check with BLOCK_M != BLOCK_N as on a GPU."""
    from longvita.kernels.attention import triton as vat

    if not vat.triton_interpret():
        pytest.skip("block override is for the interpreter")
    variant_env(variant)
    monkeypatch.setattr(vat, "_fixed_config", lambda kind, *rest: dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=1, num_stages=1))
    _check_fp32([0, 1, 37, 70, 5], [0, 3, 37, 53, 21], 2, 1, 16, True)
    _check_fp32([0, 1, 37, 70, 5], [0, 3, 37, 53, 21], 2, 1, 16, False, (9, 4))


def test_fused_backward_is_close_run_to_run(variant_env):
    """The fused backward adds dQ with atomics: not bit-wise deterministic on a GPU, but two
    runs agree to rounding (the interpreter runs programs in order, so here they are equal)."""
    variant_env("fused_bwd")
    q, k, v, cu_q, cu_k, mq, mk = _inputs(LENS, LENS, 4, 1, 32, torch.float32)
    dout = torch.randn_like(q)
    out, lse = varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, causal=True, backend="triton")
    g1 = varlen_attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, mq, mk, causal=True, backend="triton")
    g2 = varlen_attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, mq, mk, causal=True, backend="triton")
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# The sorted work list
# ---------------------------------------------------------------------------------------


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("query_blocks", [True, False], ids=["q-blocks", "kv-blocks"])
def test_work_list_has_every_block_once_heaviest_first(query_blocks):
    from longvita.kernels.attention import triton as vat

    lens_q, lens_k, block = [0, 1, 70, 33, 0, 129], [0, 5, 70, 40, 2, 129], 32
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    rows, cols = (cu_q, cu_k) if query_blocks else (cu_k, cu_q)
    lens = lens_q if query_blocks else lens_k
    total = sum(lens) + 7  # rows past cu_seqlens[-1] belong to no item
    items = vat._work_list(rows, cols, total, block, query_blocks, 0, 0, False, True).cpu()
    assert items.dtype == torch.int32 and items.shape == (math.ceil(total / block) + len(lens), 2)
    real = [tuple(x) for x in items.tolist() if x[0] >= 0]
    want = [(b, m) for b, n in enumerate(lens) for m in range(math.ceil(n / block))]
    assert sorted(real) == sorted(want)
    assert all(x[0] == -1 for x in items.tolist()[len(real):]), "padding items come last"

    def cost(b, m):  # keys a causal q block sees / queries that see a kv block (bottom-right)
        lq, lk = lens_q[b], lens_k[b]
        start = m * block
        if query_blocks:
            return max(min(lk, start + lk - lq + block), 0)
        return max(lq - max(start - (lk - lq), 0), 0)

    costs = [cost(*x) for x in real]
    assert costs == sorted(costs, reverse=True), "heaviest first"


def test_work_list_is_cached_per_cu_seqlens_and_version():
    from longvita.kernels.attention import triton as vat

    cu = _cu([5, 40])
    a = vat._work_list(cu, cu, 45, 16, True, 0, 0, False, True)
    assert vat._work_list(cu, cu, 45, 16, True, 0, 0, False, True) is a  # every layer reuses it
    assert vat._work_list(cu, cu, 45, 32, True, 0, 0, False, True) is not a  # another block size
    cu[2] = 30  # an in-place change bumps the version: a new list
    b = vat._work_list(cu, cu, 45, 16, True, 0, 0, False, True)
    assert b is not a and sorted(x[0] for x in b.tolist() if x[0] >= 0) == [0, 1, 1]


# ---------------------------------------------------------------------------------------
# TMA: the fallback for tensors the copy engine cannot read
# ---------------------------------------------------------------------------------------


def test_tma_falls_back_for_misaligned_tensors(variant_env, monkeypatch):
    from longvita.kernels.attention import triton as vat

    variant_env("tma")
    q, k, v, cu_q, cu_k, mq, mk = _inputs([9, 20], [9, 20], 2, 1, 16, torch.float32)
    assert vat._use_tma(lt.parse_variant("tma"), q, k, v)
    buf = torch.randn(q.numel() + 1, device=DEVICE)
    q_off = buf[1:].view(q.shape).copy_(q)  # base 4 bytes past a 16-byte boundary
    assert not vat._use_tma(lt.parse_variant("tma"), q_off, k, v)
    seen = []
    real = vat._use_tma
    monkeypatch.setattr(vat, "_use_tma", lambda var, *t: seen.append(real(var, *t)) or seen[-1])
    out, lse = varlen_attention_fwd(q_off, k, v, cu_q, cu_k, mq, mk, causal=True, backend="triton")
    assert seen == [False]
    r_out, r_lse = ref.varlen_attention_fwd_reference(q.double(), k.double(), v.double(), cu_q, cu_k, None, True)
    assert _max_err(out, r_out) / _max_abs(r_out) < 1e-5


# ---------------------------------------------------------------------------------------
# Choosing a variant; the launch table
# ---------------------------------------------------------------------------------------


def test_parse_variant_names_and_errors():
    assert lt.parse_variant("default") == lt.DEFAULT == lt.parse_variant("")
    v = lt.parse_variant("persistent+tma+fused_bwd")
    assert (v.tma, v.schedule, v.fused_bwd, v.warp_specialize) == (True, "persistent", True, False)
    assert v.name == "tma+persistent+fused_bwd"  # canonical order
    assert lt.parse_variant("ws").name == "tma+ws"  # warp specialisation takes TMA loads
    assert lt.parse_variant("ws").features("dkdv") == {"tma"}  # ws changes the forward only
    with pytest.raises(ValueError, match="unknown: tam"):
        lt.parse_variant("tam+sorted")
    with pytest.raises(ValueError, match="pick one"):
        lt.parse_variant("sorted+persistent")


def test_unknown_variant_in_environment_raises_before_launch(variant_env, monkeypatch):
    from longvita.kernels.attention import triton as vat

    launched = []
    monkeypatch.setattr(vat, "_launch", lambda *a, **k: launched.append(a))
    variant_env("tma+warp")
    q, k, v, cu_q, cu_k, mq, mk = _inputs([3, 5], [3, 5], 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match=f"{lt.ENV} must be 'default' or features"):
        varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, backend="triton")
    assert launched == []


def test_variant_selection_order(monkeypatch):
    """explicit argument > LONGVITA_ATTENTION_VARIANT > the table's choice for the shape."""
    table = copy.deepcopy(lt.load_table())
    table["choice"] = [{"block_d": 128, "causal": True, "fwd": "tma+sorted", "bwd": "fused_bwd"}]
    monkeypatch.setattr(lt, "_TABLE", lt._check_table(table, "test"))
    monkeypatch.delenv(lt.ENV, raising=False)
    assert lt.variant_for("fwd", 128, True).name == "tma+sorted"
    assert lt.variant_for("bwd", 128, True).name == "fused_bwd"
    assert lt.variant_for("fwd", 128, False) == lt.DEFAULT  # no choice for the shape
    assert lt.variant_for("fwd", 64, True) == lt.DEFAULT
    monkeypatch.setenv(lt.ENV, "persistent")
    assert lt.variant_for("fwd", 128, True).name == "persistent"
    assert lt.variant_for("fwd", 128, True, "budget").name == "budget"


def test_table_config_takes_the_most_specific_entry(monkeypatch):
    table = {"configs": {
        "default": {"fwd": {"128": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, measured="x")}},
        "tma": {"fwd": {"128": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)}},
        "tma+persistent": {"fwd": {"128": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)}},
        "ws": {"fwd": {"128": dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2)}},
    }}
    monkeypatch.setattr(lt, "_TABLE", lt._check_table(table, "test"))
    cfg = lambda name, kernel="fwd": lt.table_config(kernel, 128, lt.parse_variant(name))  # noqa: E731
    assert cfg("default")["num_warps"] == 8
    assert cfg("tma") == dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    assert cfg("tma+persistent+fused_bwd")["BLOCK_N"] == 64 and cfg("tma+persistent+fused_bwd")["num_stages"] == 2
    assert cfg("tma+sorted") == cfg("tma")
    assert cfg("ws")["num_warps"] == 4  # 'ws' (with its implied tma) beats 'tma'
    assert cfg("sorted") == cfg("default")
    assert cfg("tma", "dkdv") is None  # nothing for that kernel: the launcher reasons one
    assert lt.measured_configs() == {("fwd", 128): dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)}


def test_shipped_table_is_valid_and_keeps_the_measured_defaults():
    table = lt.load_table(lt.TABLE_PATH)
    measured = lt.measured_configs()
    # the H100-measured configs of 2026-11-25 (RESULTS.md) stay the default until a chip says otherwise
    assert measured[("fwd", 128)] == dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
    assert measured[("dkdv", 128)] == dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=1)
    assert all(c["fwd"] == c["bwd"] == "default" for c in table["choice"] if "measured" not in c)


@pytest.mark.parametrize("bad,match", [
    ({"configs": {"tam": {}}}, "unknown: tam"),
    ({"configs": {"default": {"fwdd": {}}}}, "names kernel 'fwdd'"),
    ({"configs": {"default": {"fwd": {"128": {"BLOCK_M": 64}}}}}, "must map a head dim"),
    ({"configs": {}, "choice": [{"block_d": 128, "causal": True, "fwd": "tma"}]}, "lacks"),
])
def test_bad_tables_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        lt.set_table(bad)
    lt.set_table(None)


@pytest.mark.parametrize("variant", ["ws", "tma+sorted+ws"])
def test_ws_refused_on_gpu_before_launch(variant, monkeypatch):
    """An H100 gave non-finite outputs for 'ws' (2026-12-05): off the interpreter it is refused
    with one error naming the variant, before any buffer is written or kernel launched."""
    import longvita.kernels.attention.triton as vat

    monkeypatch.setattr(vat, "triton_interpret", lambda: False)
    launched = []
    monkeypatch.setattr(vat, "_launch", lambda *a, **k: launched.append(a))
    q, k, v = (torch.randn(9, 2, 32) for _ in range(3))
    cu = torch.tensor([0, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"'ws' is disabled on GPUs"):
        vat.varlen_attention_fwd_triton(q, k, v, cu, cu, 9, 9, 32 ** -0.5, True, (-1, -1), variant=variant)
    assert not launched
    # the same call with a variant that runs on GPUs gets past the check to the launch
    vat.varlen_attention_fwd_triton(q, k, v, cu, cu, 9, 9, 32 ** -0.5, True, (-1, -1), variant="tma")
    assert len(launched) == 1
