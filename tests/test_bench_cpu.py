"""benchmarks/bench_cpu.py runs on the CPU (every attention case at two small lengths, and the
end-to-end part through subprocesses of this checkout) and writes JSON that make_results.py
reads, with every case and sane numbers; the two sides of each attention case compute the
same attention, so its ratio compares like with like."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_cpu as bc  # noqa: E402
from make_results import to_markdown  # noqa: E402

from _bench import cpu_smoke_payload  # noqa: E402

SMOKE_LENGTHS = (256, 512)  # the CPU smoke run's


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    return cpu_smoke_payload("bench_cpu.py", tmp_path_factory.mktemp("bench") / "cpu.json", "--e2e")


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_payload(p):
    """Every check the CPU run must pass; raises AssertionError naming what is wrong."""
    assert p["name"] == "cpu" and p["environment"]["device"]
    rows = p["rows"]
    for n in SMOKE_LENGTHS:
        for what in bc.CASES:
            label = f"(a) {what} {n}"
            got = [r for r in rows if r["case"] == label]
            assert [r["impl"] for r in got][:1] == ["longvita"] and len(got) == 2, f"{label}: {got}"
            assert got[1]["impl"].startswith("torch sdpa"), label
            for r in got:
                assert _finite_positive(r["metrics"].get("ms")) and r["metrics"]["tokens"] == n, f"{label}: {r}"
            assert _finite_positive(got[0]["metrics"].get("ratio")), f"{label}: {got[0]}"
    e2e = {r["case"]: r["metrics"] for r in rows if r["case"].startswith("(b)") and r["impl"] == "this checkout"}
    assert set(e2e) == {"(b) generate, whole process", "(b) text prompt, prefill", "(b) demo recipe training"}, e2e
    assert _finite_positive(e2e["(b) generate, whole process"].get("s")), e2e
    prompt = e2e["(b) text prompt, prefill"]
    assert prompt.get("prompt_tokens", 0) >= 500 and _finite_positive(prompt.get("prefill_s")), prompt
    assert _finite_positive(e2e["(b) demo recipe training"].get("tok_s")), e2e


def test_cpu_run_writes_every_case(payload):
    check_payload(payload)
    table = to_markdown(payload)
    for r in payload["rows"]:
        assert f"| {r['case']} | {r['impl']} |" in table


def test_checks_catch_a_broken_result(payload):
    broken = json.loads(json.dumps(payload))
    broken["rows"] = [r for r in broken["rows"] if r["case"] != "(a) decode 512"]
    with pytest.raises(AssertionError, match="decode 512"):
        check_payload(broken)
    broken = json.loads(json.dumps(payload))
    next(r for r in broken["rows"] if r["case"] == "(a) fwd+lse 256")["metrics"]["ratio"] = float("nan")
    with pytest.raises(AssertionError, match="fwd\\+lse 256"):
        check_payload(broken)
    broken = json.loads(json.dumps(payload))
    next(r for r in broken["rows"] if r["case"] == "(b) demo recipe training")["metrics"]["tok_s"] = 0
    with pytest.raises(AssertionError):
        check_payload(broken)


@pytest.mark.parametrize("what", bc.CASES)
def test_both_sides_compute_the_same_attention(what, monkeypatch):
    """Outputs (and, where the case runs a backward, the gradients through the output) of
    longvita and of the SDPA baseline agree on the case's data, at a length where the chunk
    is shorter than the cache and the pack has seven documents. (The CPU path, as the script
    runs it: the tests' Triton interpreter would take minutes.)"""
    monkeypatch.setenv("LONGVITA_BACKEND", "torch")
    torch.manual_seed(0)
    pair = bc.setup(bc.Case(what, 2053))
    ours, theirs = pair.ours(), pair.theirs()
    torch.testing.assert_close(ours[0], bc.sdpa_as_thd(theirs), rtol=1e-4, atol=1e-5)
    if pair.grad:
        dout = torch.randn_like(ours[0])
        torch.autograd.backward(ours[0], dout)
        torch.autograd.backward(bc.sdpa_as_thd(theirs), dout)
        q, k, v, tq, tk, tv = pair.leaves
        for a, b in ((q, tq), (k, tk), (v, tv)):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_case_shapes():
    lens = bc._pack_lengths(65536)
    assert len(lens) == 7 and sum(lens) == 65536 and min(lens) > 0
    assert len(bc._prompt_text(40000)) == 40000


def test_ratio_is_ours_over_theirs_per_repeat(monkeypatch):
    """A clock that only the timed calls advance: ours takes 3 units then 1, theirs 1 then 1,
    so the paired ratios are 3 and 1 (median 2) while each side's median is its own."""
    clock = [0.0]
    costs = {"ours": iter([5.0, 3.0, 1.0]), "theirs": iter([5.0, 1.0, 1.0])}  # warm-up, then two repeats

    def call(name):
        return lambda: clock.__setitem__(0, clock[0] + next(costs[name]))

    monkeypatch.setattr(bc.time, "perf_counter", lambda: clock[0])
    ms_ours, ms_theirs, ratio, repeats = bc.time_pair(call("ours"), call("theirs"), 2, 2, 0.0, repeat_ms=1.0)
    assert repeats == 2 and ratio == pytest.approx(2.0)
    assert ms_ours == pytest.approx(2000.0) and ms_theirs == pytest.approx(1000.0)
