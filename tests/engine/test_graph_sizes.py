"""Which decode batch sizes the engine captures as CUDA graphs (the capture itself is GPU-only:
tests/kernels/test_gpu_engine.py)."""

import pytest

from server.engine.cuda_graphs import capture_sizes


@pytest.mark.parametrize("limit", [1, 2, 3, 63, 64, 65, 128, 129, 200, 256, 300, 512, 513, 1000])
def test_every_batch_up_to_the_limit_has_a_graph(limit):
    sizes = capture_sizes(limit)
    assert sizes == sorted(set(sizes)) and sizes[-1] == limit
    for b in range(1, limit + 1):
        padded = next(s for s in sizes if s >= b)
        # padding a batch up to its graph never more than doubles it, and stays within 64 rows
        # (a quarter of the batch) once batches are large
        assert padded - b <= max(b, 1) and (b < 256 or padded - b < 64), (b, padded)


def test_small_limits_and_the_default_ladder():
    assert capture_sizes(1) == [1]
    assert capture_sizes(128) == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128]
    assert capture_sizes(256)[-5:] == [128, 160, 192, 224, 256]
    assert capture_sizes(700)[-4:] == [512, 576, 640, 700]


def test_a_limit_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        capture_sizes(0)
