"""bench/gemv_timeline.py's analysis of per-warp trace records (no GPU: synthetic records whose
phases are known), and the trace build switch."""

from bench.gemv_timeline import phases, summarize, table, warp_units
from quant.backends import cuda_build


def _rec(key, sm, warp, entry, wait, exit_):
    return (key << 32 | sm << 16 | warp, entry, wait, exit_)


def test_phases_of_two_back_to_back_calls():
    # call A (key 7): 10 warps on 5 SMs, entries at 0 ns, past the wait from 1000 to 1900 ns, exits
    # 5000..5900 with one straggler at 9000. Call B (key 3): enters at 8000 (PDL), past its wait
    # at 9500 (after A's last exit), exits 12000..12900.
    rows = [_rec(7, w % 5, w, 0, 1000 + 100 * w, 5000 + 100 * w) for w in range(9)]
    rows.append(_rec(7, 4, 9, 0, 1900, 9000))
    rows += [_rec(3, w % 5, w, 8000, 9500 + 10 * w, 12000 + 100 * w) for w in range(10)]
    rows.append(_rec(7, 0, 10, 0, 1000, 5000))  # an 11th warp of A
    calls = summarize(rows)
    assert [c.key for c in calls] == [7, 3]  # ordered by when they got past their waits
    a, b = calls
    assert a.warps == 11 and a.sms == 5 and b.warps == 10
    assert (a.wait_first, a.wait_last, a.exit_last) == (1.0, 1.9, 9.0)
    assert b.entry_first == 8.0 and b.wait_first == 9.5 and b.exit_p90 == 12.9
    pa, pb = phases(calls)
    assert pa["gap"] == 0.0 and abs(pa["early"] - 1.0) < 1e-9 and abs(pa["ramp"] - 0.9) < 1e-9
    assert abs(pb["gap"] - 0.5) < 1e-9 and abs(pb["early"] - 1.5) < 1e-9
    assert abs(pa["tail"] - (9.0 - a.exit_p90)) < 1e-9 and abs(pb["body"] - (12.9 - 9.5)) < 1e-9
    rows_t = table([pa, pb], ["o", "o"])
    assert rows_t[0]["layer"] == "o" and rows_t[0]["calls"] == 2
    assert rows_t[-1]["layer"] == "step (sums)" and abs(rows_t[-1]["gap"] - 0.5) < 0.05


def test_tags_with_the_top_bit_set_keep_their_key():
    key = 0xFFFF_FFFF  # an address whose bits 8..39 are all set: the tag is negative as an int64
    tag = (key << 32 | 3 << 16 | 5) - (1 << 64)
    (call,) = summarize([(tag, 10, 20, 30)])
    assert call.key == key and call.sms == 1 and call.warps == 1


def test_trace_build_is_a_separate_build(monkeypatch):
    monkeypatch.delenv("QUANTSERVE_CUDA_TRACE", raising=False)
    plain = cuda_build.extension_spec(archs=("90a",))
    monkeypatch.setenv("QUANTSERVE_CUDA_TRACE", "1")
    traced = cuda_build.extension_spec(archs=("90a",))
    assert "-DQS_GEMV_TRACE" in traced.cuda_cflags and "-DQS_GEMV_TRACE" not in plain.cuda_cflags
    assert "qs_trace.cuh" in traced.headers


def test_exits_split_by_the_units_each_warp_ran():
    # 5 units over 4 warps: warp 3 runs two (ranges [0,1) [1,2) [2,3) [3,5)), the others one.
    assert [warp_units(5, 4, w) for w in range(4)] == [1, 1, 1, 2]
    assert sum(warp_units(2048, 1584, w) for w in range(1584)) == 2048
    assert sum(warp_units(2048, 1584, w) == 2 for w in range(1584)) == 464
    rows = [_rec(9, w, w, 0, 1000, 4000 + 100 * w) for w in range(3)] + [_rec(9, 3, 3, 0, 1000, 7000)]
    (call,) = summarize(rows, {9: 5})
    assert call.exits_by_units == ((1, 3, 3.1, 3.2), (2, 1, 6.0, 6.0))
    (p,) = phases([call])
    (row, _) = table([p], ["o"])
    assert row["exit_by_units"] == {1: (3.1, 3.2), 2: (6.0, 6.0)}
    (plain,) = summarize(rows)  # no unit totals: no split
    assert plain.exits_by_units == ()


def test_first_unit_latency_from_five_column_records():
    # Warps past their waits at 1000..1300 ns; their first units done 2000, 2500, 3000 ns after;
    # a warp without units (first 0) does not count.
    rows = [(_rec(5, w, w, 0, 1000 + 100 * w, 9000) + (1000 + 100 * w + d,)) for w, d in enumerate((2000, 2500, 3000))]
    rows.append(_rec(5, 3, 3, 0, 1300, 1400) + (0,))
    (call,) = summarize(rows)
    assert call.first == 2.5
    (p,) = phases([call])
    assert p["first"] == 2.5 and table([p], ["o"])[0]["first"] == 2.5
    (old,) = summarize([r[:4] for r in rows])  # 4-column records: no first-unit time
    assert old.first != old.first  # nan


def test_first_unit_operands_from_six_column_records():
    # Warps past their waits at 1000..1200 ns; operands in 600, 700, 800 ns after, first units done
    # 2000, 2500, 3000 ns after; a warp without units (first 0, operands 0) does not count.
    waits = (1000, 1100, 1200)
    rows = [_rec(5, w, w, 0, t, 9000) + (t + d, t + o) for w, (t, d, o) in enumerate(zip(waits, (2000, 2500, 3000),
                                                                                      (600, 700, 800)))]
    rows.append(_rec(5, 3, 3, 0, 1300, 1400) + (0, 0))
    (call,) = summarize(rows)
    assert call.first == 2.5 and call.data == 0.7
    (p,) = phases([call])
    assert p["data"] == 0.7 and table([p], ["o"])[0]["data"] == 0.7
    (five,) = summarize([r[:5] for r in rows])  # 5-column records: no operand time
    assert five.first == 2.5 and five.data != five.data  # nan
