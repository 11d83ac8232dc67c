"""bench/gemm_timeline.py's analysis of the GEMM's per-block trace records (no GPU: synthetic records
whose phases are known), and that the trace build carries the GEMM's trace header."""

from bench.gemm_timeline import KIND_GEMM, KIND_SUMS_TO_Y, calls_of, parse, table
from quant.backends import cuda_build


def _rec(key, sm, block, entry, wait, loop, out, drain, exit_, flushes=1, drains=0, tokens=64, kind=KIND_GEMM):
    tag = key << 32 | sm << 16 | block
    if tag >= 1 << 63:  # as int64 comes back from the extension
        tag -= 1 << 64
    info = flushes | drains << 16 | tokens << 32 | kind << 48
    return (tag, entry, wait, loop, out, drain, exit_, info)


def test_parse_unpacks_tag_and_info():
    b = parse(_rec(0xFFFF_FFFF, 7, 300, 1, 2, 3, 4, 5, 6, flushes=2, drains=1, tokens=128))
    assert (b.key, b.sm, b.block) == (0xFFFF_FFFF, 7, 300)
    assert (b.entry, b.wait, b.loop, b.out, b.drain, b.exit) == (1, 2, 3, 4, 5, 6)
    assert (b.flushes, b.drains, b.tokens, b.kind) == (2, 1, 128, KIND_GEMM)


def test_phases_of_a_split_call_then_a_call_with_sums_to_y():
    # Call A (key 5): 4 blocks entering at 0 ns, past the wait at 1000-1300, loops done 5000 ns after
    # their waits, sums out 500 ns later; block 3 drains from 7000 to 9000; the others exit at 6800.
    rows = [_rec(5, b, b, 0, 1000 + 100 * b, 6000 + 100 * b, 6500 + 100 * b, 0, 6800) for b in range(3)]
    rows.append(_rec(5, 3, 3, 0, 1300, 6300, 6800, 7000, 9000, drains=1))
    # Call B (key 9): 2 blocks past the wait at 9500 (after A's end), exits at 12000; then a sums_to_y
    # launch of 2 blocks past its wait at 12100, exits at 13000 and 13500.
    rows += [_rec(9, b, b, 8000, 9500, 11000, 11500, 0, 12000) for b in range(2)]
    rows += [_rec(0, b, b, 11000, 12100, 0, 0, 0, 13000 + 500 * b, flushes=0, kind=KIND_SUMS_TO_Y) for b in range(2)]
    a, b = calls_of([parse(r) for r in rows])
    assert (a["key"], a["blocks"], a["sms"], a["drainers"], a["s2y_blocks"]) == (5, 4, 4, 1, 0)
    assert a["early"] == 1.0 and abs(a["ramp"] - 0.3) < 1e-9
    assert a["loop"] == 5.0 and a["loop_max"] == 5.0 and a["out"] == 0.5 and a["drain"] == 2.0
    assert a["tail"] == 0.0 and a["s2y"] == 0.0 and a["gap"] == 0.0 and a["share"] == 8.0  # 1.0 -> 9.0 us
    assert (b["key"], b["s2y_blocks"], b["drainers"]) == (9, 2, 0)
    assert b["gap"] == 0.5 and b["s2y"] == 1.5 and b["share"] == 4.5  # 9.0 -> 13.5 us
    assert b["early"] == 1.5 and b["loop"] == 1.5
    rows_t = table([a, b], ["o", "down"])
    assert [r["layer"] for r in rows_t] == ["o", "down", "step"]
    assert rows_t[-1]["share"] == 12.5 and rows_t[-1]["gap"] == 0.5
    assert rows_t[0]["drain"] == 2.0 and rows_t[1]["s2y"] == 1.5


def test_trace_build_carries_the_gemm_trace_header(monkeypatch):
    monkeypatch.setenv("QUANTSERVE_CUDA_TRACE", "1")
    spec = cuda_build.extension_spec(archs=("90a",))
    assert "qs_gemm_trace.cuh" in spec.headers and "-DQS_GEMV_TRACE" in spec.cuda_cflags
