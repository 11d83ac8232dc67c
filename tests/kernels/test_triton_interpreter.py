"""CI has no GPU, so the Triton kernels of the decode step would go unchecked there: this runs their
tests (test_fused_kernels, test_sums, test_triton_attention) again in a subprocess under Triton's
interpreter (TRITON_INTERPRET=1, read when the kernels are defined), where they take CPU tensors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("tests/kernels/test_fused_kernels.py", "tests/kernels/test_sums.py",
           "tests/kernels/test_triton_attention.py")


def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (make test installs it)")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the GPU tests run the compiled kernels")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *MODULES],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # the interpreted kernels ran (fp16 and fp32 on the CPU), they were not skipped
    for module, case in ((0, "test_fused_triton_kernels_equal_torch[fp16-cpu]"),
                         (0, "test_fused_triton_kernels_equal_torch[fp32-cpu]"),
                         (1, "test_fused_readers_take_sums_as_the_tensor_they_stand_for[rows-1-32-8-128-fp16-cpu]"),
                         (1, "test_fused_readers_take_sums_as_the_tensor_they_stand_for[columns-3-9-3-64-fp16-cpu]"),
                         (1, "test_qkv_reader_splits_a_row_over_programs[2-cpu]"),
                         (1, "test_fused_readers_take_sums_as_the_tensor_they_stand_for[columns-40-8-2-64-fp16-cpu]"),
                         (1, "test_column_readers_take_partial_blocks[576-13-16-cpu]"),
                         (1, "test_qkv_reader_stores_k_and_v_in_the_cache[columns-fp16-cpu]"),
                         (2, "test_triton_decode_attention_matches_reference[fp16-64-8-128-cpu]"),
                         (2, "test_triton_decode_attention_matches_reference[fp16-2-2-64-cpu]"),
                         (2, "test_write_kv_fills_exactly_the_slots[cpu]")):
        assert f"PASSED {MODULES[module]}::{case}" in out, out[-4000:]
