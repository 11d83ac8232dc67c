"""gemv_launch_options / gemm_launch_options set the kernel launch options for a block and restore
them (no GPU needed: the extension is replaced by a stand-in that records what it is told)."""

import types

import pytest

from quant.backends import cuda as cuda_backend
from quant.backends import cuda_route


class _Ext:
    def __init__(self):
        self.options = (True, 1, True)
        self.calls = []

    def gemv_get_options(self):
        return self.options

    def gemv_set_options(self, pdl, wave_div, pipeline):
        self.calls.append((pdl, wave_div, pipeline))
        self.options = (pdl, wave_div, pipeline)

    gemm = (True, True, True)

    def gemm_get_options(self):
        return self.gemm

    def gemm_set_options(self, wgmma, pdl, y_sums):
        self.calls.append(("gemm", wgmma, pdl, y_sums))
        self.gemm = (wgmma, pdl, y_sums)


def test_options_apply_inside_and_come_back(monkeypatch):
    ext = _Ext()
    monkeypatch.setattr(cuda_backend, "extension", lambda: ext)
    with cuda_backend.gemv_launch_options(False, 2):
        assert ext.options == (False, 2, True)
    assert ext.options == (True, 1, True)
    with cuda_backend.gemv_launch_options(wave_div=3):  # None keeps the others as they are
        assert ext.options == (True, 3, True)
    with cuda_backend.gemv_launch_options(pipeline=False):
        assert ext.options == (True, 1, False)
    assert ext.options == (True, 1, True)
    with pytest.raises(RuntimeError), cuda_backend.gemv_launch_options(pdl=False):
        assert ext.options == (False, 1, True)
        raise RuntimeError("the block failed")
    assert ext.options == (True, 1, True) and ext.calls[-1] == (True, 1, True)


def test_gemm_option_applies_inside_and_comes_back(monkeypatch):
    ext = _Ext()
    monkeypatch.setattr(cuda_backend, "extension", lambda: ext)
    with cuda_backend.gemm_launch_options(False):
        assert ext.gemm == (False, True, True)  # pdl and y_sums kept
    assert ext.gemm == (True, True, True)
    with cuda_backend.gemm_launch_options(pdl=False):  # None keeps wgmma and y_sums as they are
        assert ext.gemm == (True, False, True)
    assert ext.gemm == (True, True, True)
    with cuda_backend.gemm_launch_options(y_sums=False):
        assert ext.gemm == (True, True, False)
    assert ext.gemm == (True, True, True)
    with pytest.raises(RuntimeError), cuda_backend.gemm_launch_options(False, False, False):
        assert ext.gemm == (False, False, False)
        raise RuntimeError("the block failed")
    assert ext.gemm == (True, True, True) and ext.calls[-1] == ("gemm", True, True, True)


def test_pipe_takes_asks_the_extension_once_per_case_under_the_same_options(monkeypatch):
    """An eager call of 9-16 tokens asks pipe_takes; the answer is the extension's the first time for
    each (device, m, bits, group shift, zeros), remembered after, and asked again once
    gemv_launch_options has changed the options it depends on (pipeline)."""
    ext = _Ext()
    asked = []

    def gemv_pipe_takes(device, m, bits, group_shift, has_zeros):
        asked.append((device, m, bits, group_shift, has_zeros))
        return ext.options[2] and not (m > 8 and has_zeros)

    ext.gemv_pipe_takes = gemv_pipe_takes
    monkeypatch.setattr(cuda_backend, "extension", lambda: ext)
    monkeypatch.setattr(cuda_backend, "_PIPE_TAKES", {})
    sym = types.SimpleNamespace(bits=4, group_shift=3, constants={"f16": (object(), None, None)})
    asym = types.SimpleNamespace(bits=4, group_shift=3, constants={"f16": (object(), object(), None)})
    assert cuda_backend.pipe_takes(sym, 12, 0) and cuda_backend.pipe_takes(sym, 12, 0)
    assert not cuda_backend.pipe_takes(asym, 12, 0) and cuda_backend.pipe_takes(asym, 8, 0)
    assert cuda_backend.pipe_takes(sym, 12, 1)
    assert asked == [(0, 12, 4, 3, False), (0, 12, 4, 3, True), (0, 8, 4, 3, True), (1, 12, 4, 3, False)]
    with cuda_backend.gemv_launch_options(pipeline=False):
        assert not cuda_backend.pipe_takes(sym, 12, 0)
    assert cuda_backend.pipe_takes(sym, 12, 0)  # the options came back, and so did the answer
    assert asked[4:] == [(0, 12, 4, 3, False)] * 2


def test_pick_op_sends_9_to_32_tokens_to_the_wgmma_gemm_only_where_it_runs():
    asked = []

    def answer(what, value):
        return lambda: asked.append(what) or value

    for m in (1, 4, 8):
        assert cuda_backend.pick_op(m, answer("wgmma", True), answer("pipe", True)) == "gemv"
    assert asked == []  # below WGMMA_MIN_M neither the device nor the layer is asked
    for m in (9, 12, 16, 24, 32):
        assert cuda_backend.pick_op(m, answer("wgmma", True)) == "gemm"
        assert cuda_backend.pick_op(m, answer("wgmma", False)) == "gemv"
        assert cuda_backend.pick_op(m, answer("wgmma", True), answer("pipe", False)) == "gemm"
    for m in (33, 64, 200, cuda_backend.DEQUANT_MIN_M - 1):
        assert cuda_backend.pick_op(m, answer("wgmma", False)) == "gemm"
    assert cuda_backend.WGMMA_MIN_M == 9 and cuda_backend.CudaBackend.gemv_max_m == 32


def test_pick_op_keeps_9_to_16_tokens_on_the_pipelined_gemv_where_it_takes_the_layer():
    asked = []

    def answer(what, value):
        return lambda: asked.append(what) or value

    for m in range(cuda_backend.WGMMA_MIN_M, cuda_backend.PIPE_MAX_M + 1):
        assert cuda_backend.pick_op(m, answer("wgmma", True), answer("pipe", True), sums=True) == "gemv"
        assert cuda_backend.pick_op(m, answer("wgmma", False), answer("pipe", True)) == "gemv"
        # writing y, the wgmma GEMM from PIPE_Y_MAX_M + 1 tokens
        want = "gemv" if m <= cuda_backend.PIPE_Y_MAX_M else "gemm"
        assert cuda_backend.pick_op(m, answer("wgmma", True), answer("pipe", True)) == want
    # the layer is asked only where the device runs wgmma and the token count is in the range
    assert asked.count("pipe") == (cuda_backend.PIPE_MAX_M - 8) + (cuda_backend.PIPE_Y_MAX_M - 8)
    asked.clear()
    for m in (cuda_backend.PIPE_MAX_M + 1, 32):  # above PIPE_MAX_M the layer is not asked
        assert cuda_backend.pick_op(m, answer("wgmma", True), answer("pipe", True), sums=True) == "gemm"
    assert asked == ["wgmma", "wgmma"]
    assert cuda_backend.PIPE_MAX_M == 16 == cuda_backend.SUMS_MAX_M and cuda_backend.PIPE_Y_MAX_M == 12


def test_pick_op_sends_sums_for_column_readers_to_the_wgmma_gemm_from_9_tokens(monkeypatch):
    """Sums whose reader takes the GEMM's [column][token slot] layout as it is (columns) go to the
    wgmma GEMM from WGMMA_MIN_M tokens even where the pipelined GEMV takes the layer (the layer is
    not asked); without wgmma, below WGMMA_MIN_M, for y, or with COLUMN_SUMS off, as before."""
    asked = []

    def answer(what, value):
        return lambda: asked.append(what) or value

    for m in range(cuda_backend.WGMMA_MIN_M, cuda_backend.PIPE_MAX_M + 1):
        asked.clear()
        assert cuda_backend.pick_op(m, answer("wgmma", True), answer("pipe", True), sums=True, columns=True) == "gemm"
        assert asked == ["wgmma"]
        assert cuda_backend.pick_op(m, answer("wgmma", False), answer("pipe", True), sums=True, columns=True) == "gemv"
        assert cuda_backend.pick_op(m, answer("wgmma", True), answer("pipe", True), sums=True) == "gemv"
    for m in range(1, cuda_backend.WGMMA_MIN_M):
        assert cuda_backend.pick_op(m, answer("wgmma", True), answer("pipe", True), sums=True, columns=True) == "gemv"
    # columns only matters for sums: a call that writes y keeps the pipelined GEMV up to PIPE_Y_MAX_M
    assert cuda_backend.pick_op(cuda_backend.WGMMA_MIN_M, answer("wgmma", True), answer("pipe", True),
                                columns=True) == "gemv"
    monkeypatch.setattr(cuda_route, "COLUMN_SUMS", False)  # the routing rule reads its own module's
    assert cuda_backend.pick_op(12, answer("wgmma", True), answer("pipe", True), sums=True, columns=True) == "gemv"


def test_pick_op_sends_prefill_sized_calls_to_dequant_and_cublas():
    asked = []
    for m in (cuda_backend.DEQUANT_MIN_M, 1024, 8192):
        for answer in (True, False):
            assert cuda_backend.pick_op(m, lambda a=answer: asked.append(a) or a) == "dequant"
    assert asked == [] and cuda_backend.DEQUANT_MIN_M == 512


def test_dequant_threshold_comes_from_the_environment():
    import os
    import subprocess
    import sys

    code = "import quant.backends.cuda as c; print(c.DEQUANT_MIN_M)"
    env = dict(os.environ, QUANTSERVE_DEQUANT_MIN_M="4096")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.strip() == "4096"


def test_gather_falls_back_to_index_select_where_the_kernel_cannot_take_it(monkeypatch):
    """K not a multiple of 8 (or a misaligned permutation) gathers with index_select, without the
    extension (which would refuse the call)."""
    import types

    import torch

    def no_extension():
        raise AssertionError("the gather kernel was asked for a K it cannot take")

    monkeypatch.setattr(cuda_backend, "extension", no_extension)
    perm = torch.tensor([3, 0, 2, 1, 5, 4, 11, 10, 9, 8, 7, 6])
    state = types.SimpleNamespace(perm=perm, perm32=perm.to(torch.int32))
    x = torch.arange(24, dtype=torch.float16).reshape(2, 12)
    assert torch.equal(cuda_backend.gather_cols(x, state), x[:, perm])
