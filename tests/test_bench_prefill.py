"""benchmarks/bench_prefill.py runs on the CPU (tiny preset, simulated memory budget) and
writes JSON that make_results.py reads, with every part's cases and sane numbers."""

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_prefill as bp  # noqa: E402
from make_results import to_markdown  # noqa: E402

from _bench import cpu_smoke_payload  # noqa: E402

HEADS = ["all-logits head", "chunked head", "last-token head"]
RESOLUTION_A, RESOLUTION_B = 32, 256  # the CPU smoke run's search resolutions


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    return cpu_smoke_payload("bench_prefill.py", tmp_path_factory.mktemp("bench") / "prefill.json")


def _rows(payload, prefix):
    return [r for r in payload["rows"] if r["case"].startswith(prefix)]


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_payload(p):
    """Every check the CPU run must pass; raises AssertionError naming what is wrong."""
    assert p["name"] == "prefill" and set(p["metrics"]) >= {"ms", "max_tokens", "pred_max_tokens", "decode_tok_s",
                                                            "pred_ms", "speedup"}
    assert p["environment"]["device"]

    # (a) prefill times where the prompt fits; the largest prompt per head, next to the model's
    largest = {}
    for head in HEADS:
        timed = [r for r in _rows(p, "(a) prefill") if r["impl"] == head]
        assert len(timed) == 2, f"(a) {head}: {len(timed)} timed lengths"
        (search,) = [r for r in _rows(p, "(a) largest prompt") if r["impl"] == head]
        got, pred = search["metrics"]["max_tokens"], search["metrics"]["pred_max_tokens"]
        assert pred - RESOLUTION_A < got <= pred, f"(a) {head}: search found {got}, the budget allows {pred}"
        largest[head] = got
        for r in timed:
            if r["metrics"]["tokens"] <= got:
                assert _finite_positive(r["metrics"].get("ms")), f"(a) {head} {r['case']}: {r['metrics']}"
            else:
                assert "ms" not in r["metrics"], f"(a) {head} {r['case']} ran past its memory"
    # Table 4's point: only the last position's logits are needed
    assert largest["all-logits head"] < largest["chunked head"] <= largest["last-token head"], largest

    # (b) chunked prefill through the KV cache holds a longer prompt than any plain prefill
    (b,) = _rows(p, "(b)")
    got, pred = b["metrics"]["max_tokens"], b["metrics"]["pred_max_tokens"]
    assert pred - RESOLUTION_B < got <= pred, f"(b): search found {got}, the budget allows {pred}"
    assert got > largest["last-token head"]
    assert _finite_positive(b["metrics"].get("ms")) and _finite_positive(b["metrics"].get("decode_tok_s")), b

    # (c) decode speed at two context lengths
    decode = _rows(p, "(c)")
    assert len(decode) == 2
    for r in decode:
        assert _finite_positive(r["metrics"].get("decode_tok_s")) and _finite_positive(r["metrics"].get("ms")), r

    # (d) predicted CP scaling for P = 1, 2, 4, 8
    cp = _rows(p, "(d)")
    assert [r["impl"] for r in cp] == [f"P={n} (ring model)" for n in (1, 2, 4, 8)]
    assert cp[0]["metrics"]["speedup"] == pytest.approx(1.0)
    for r in cp:
        assert _finite_positive(r["metrics"].get("pred_ms")) and _finite_positive(r["metrics"].get("speedup")), r


def test_cpu_run_writes_every_case(payload):
    check_payload(payload)
    table = to_markdown(payload)
    for r in payload["rows"]:
        assert f"| {r['case']} | {r['impl']} |" in table


def test_checks_catch_a_broken_result(payload):
    broken = json.loads(json.dumps(payload))
    for r in broken["rows"]:
        if r["case"] == "(a) largest prompt" and r["impl"] == "all-logits head":
            r["metrics"]["max_tokens"] = r["metrics"]["pred_max_tokens"] + 1  # past the budget
    with pytest.raises(AssertionError, match="all-logits head"):
        check_payload(broken)
    broken = json.loads(json.dumps(payload))
    broken["rows"] = [r for r in broken["rows"] if not r["case"].startswith("(c)")]
    with pytest.raises(AssertionError):
        check_payload(broken)
    broken = json.loads(json.dumps(payload))
    _rows(broken, "(c)")[0]["metrics"]["decode_tok_s"] = float("nan")
    with pytest.raises(AssertionError):
        check_payload(broken)


@pytest.mark.parametrize("limit", [1, 63, 64, 100, 1000, 5000])
@pytest.mark.parametrize("start", [16, 64, 256])
def test_search_largest_finds_the_limit(start, limit):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= limit

    got = bp.search_largest(fits, start, 4096, 16)
    true = min(limit, 4096)
    assert true - 16 < got <= true or (got == 0 and true < 16)
    assert all(n <= 4096 for n in tried)
    assert len(tried) < 20


def test_cp_prediction_balances_and_pays_for_the_link():
    """With block costs proportional to their query-key pairs and a free link, the ring
    model's CP prefill is the single-device time split P ways; a slow link costs time."""
    layers, n, dense = 4, 8192, 100.0
    single_attention = n * (n + 1) / 2 * 1e-6  # ms, the same cost per pair as the blocks
    single = dense + layers * single_attention
    for p in (2, 4, 8):
        case = bp.ring_case(bp.preset("tiny"), n, p)
        block = {kind: case.pairs(kind) * 1e-6 for kind in bp.KINDS}
        free = bp.cp_predicted_ms(dense, layers, case, block, 0.0)
        assert single / free / p == pytest.approx(1.0, rel=0.02)
        slow = bp.cp_predicted_ms(dense, layers, case, block, 10 * max(block.values()))
        assert slow > 2 * free
