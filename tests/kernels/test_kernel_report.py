"""bench/kernel_report.py: which targets a set of decode-step rows meets (no GPU)."""

from bench.kernel_report import targets


def _steps(**by_backend):
    return [{"backend": b, "m": m, "ms": ms} for b, pts in by_backend.items() for m, ms in pts.items()]


def test_targets_met_and_missed():
    steps = _steps(ours={1: 1.2, 16: 1.6, 64: 2.5, 128: 4.0, 256: 7.0},
                   cublas_fp16={1: 5.0, 128: 5.5, 256: 6.0}, torch_int4={1: 2.0})
    rows = [{"backend": "ours", "layer": "o", "m": 1, "tbs": 1.5}]
    got = {t["target"]: (t["measured"], t["met"]) for t in targets(steps, rows, copy_bw=2.0)}
    assert got["step M=1 <= 1.3 ms"] == (1.2, True)
    assert got["step M=1 >= 3.8x fp16"] == (4.17, True)
    assert got["step M=1 >= 1.5x torch int4"] == (1.67, True)
    assert got["step M=16 <= 1.5 ms"] == (1.6, False)
    assert got["step M=64 <= 2.6 ms"] == (2.5, True)
    assert got["step M=128 faster than fp16"] == (1.38, True)
    assert got["step M=256 <= 1.1x fp16"] == (1.17, False)
    assert got["4096x4096 GEMV >= 70% of copy bandwidth"] == (0.75, True)


def test_targets_without_baselines_or_rows():
    got = {t["target"]: t for t in targets(_steps(ours={1: 1.5}), [], copy_bw=2.0)}
    assert got["step M=1 <= 1.3 ms"]["met"] is False
    assert got["step M=16 <= 1.5 ms"] == {"target": "step M=16 <= 1.5 ms", "measured": None, "met": None}
    assert not any("fp16" in name or "torch int4" in name or "GEMV" in name for name in got)
