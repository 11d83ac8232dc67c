"""The GEMM kernels (csrc/gemm_wgmma*.cuh on Hopper, gemm.cuh elsewhere) on the GPU: every tile size,
the split-K workspace left zero, and chained GEMMs under programmatic dependent launch.
"""

import pytest
import torch

from quant import kernels
from quant.backends import cuda as cuda_backend
from tests.kernels.cuda_checks import TOL, chain_eager_and_graph, check, cuda_layer, next_seed

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kernel", ["wgmma", "wgmma_fixup", "mma_sync"])
@pytest.mark.parametrize("k,n,bits,group_size,sym", [(576, 192, 4, 128, True), (584, 72, 8, 64, False),
                                                     (4096, 4096, 4, 32, False), (11008, 1024, 4, -1, True),
                                                     (1536, 576, 8, 128, True), (4128, 1280, 4, 32, True),
                                                     (2112, 640, 8, 64, False), (1040, 704, 4, 16, False),
                                                     (1040, 8256, 4, 32, False), (1536, 204, 8, 64, False),
                                                     (2112, 12160, 4, 128, True)])
def test_gemm_kernels_over_token_counts(kernel, k, n, bits, group_size, sym):
    """Both GEMM kernels over every tile size of the Hopper wgmma kernel (16/32/64/128/256-token
    tiles, partly filled, and 256-token slices above), split and whole tiles, partial strips, both
    dtypes. K = 4128 / 2112 end inside a stage, after stages that take the wgmma kernel's unbounded
    copies (whole tiles of 1280 / 640 columns), with groups shorter than a stage; 16-k groups
    (1040 x 704), which the 4-bit wgmma kernel takes in 128-token slices; a layer wider than 8192
    columns (65-128 tokens: two strips per warpgroup, 128-k stages), and one of 95 128-column tiles
    (65-128 tokens on an H100 / H200: tiles split over one or two blocks, through the split-K slots,
    y rows of a block's last tile staged in shared memory). On an sm_90 GPU
    the sm_90a code must be the one loaded, so wgmma=True really runs wgmma (its 16-token tiles
    multiply with mma.sync). From 32 to 128 tokens the
    wgmma kernel writes y of layers whose tiles are split over 4 blocks or more as the GEMM leaving
    its sums and sums_to_y after it ("wgmma"; a layer of 204 columns, not a multiple of 8, keeps
    the fix-up), or with its own split-K fix-up ("wgmma_fixup": y_sums off)."""
    wgmma = kernel != "mma_sync"
    if wgmma and torch.cuda.get_device_capability() == (9, 0):
        assert cuda_backend.wgmma_available(), "H100/H200 without the sm_90a wgmma kernel"
    layer = cuda_layer(k, n, bits, group_size, sym=sym, bias=bits == 8)
    with cuda_backend.gemm_launch_options(wgmma, y_sums=kernel == "wgmma"):
        # with the wgmma kernel off, up to gemv_max_m tokens take the GEMV, as off Hopper
        want = "gemm" if wgmma and cuda_backend.wgmma_available() else "gemv"
        assert cuda_backend.pick_op(16, cuda_backend.wgmma_available) == want
        for dtype in (torch.float16, torch.bfloat16):
            check(layer, (5, 16, 17, 32, 33, 48, 64, 65, 100, 128, 130, 256, 257, 513), dtype, ops=("gemm",))


def _gemm_kernel_names(layer, m: int) -> list[str]:
    x = torch.randn(m, layer.in_features, device="cuda", dtype=torch.float16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        cuda_backend.matmul(layer.kernel_state, x, op="gemm")
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "gemm" in e.name or "sums_to_y" in e.name]


def test_y_through_sums_to_y_from_32_tokens_on_layers_split_over_many_blocks():
    """Which kernels a wgmma call writing y runs: on a 4096 x 4096 layer (16 tiles of 256 columns,
    each split over many blocks) the GEMM leaving its sums and then sums_to_y at 32-128 tokens, but
    the GEMM alone (its own split-K fix-up) at 16 tokens, where the second kernel measured slower,
    and whenever the y_sums option is off."""
    if not cuda_backend.wgmma_available():
        pytest.skip("needs the sm_90a wgmma kernel")
    layer = cuda_layer(4096, 4096, 4, 128, sym=True)
    for y_sums in (True, False):
        with cuda_backend.gemm_launch_options(y_sums=y_sums):
            for m in (9, 16, 17, 32, 64, 128):
                names = _gemm_kernel_names(layer, m)
                assert sum("gemm_wgmma_kernel" in name for name in names) == 1, (m, names)
                assert any("sums_to_y" in name for name in names) == (y_sums and m > 16), (y_sums, m, names)


@pytest.mark.parametrize("y_sums", [True, False])
@pytest.mark.parametrize("k,n,bits", [(4096, 4096, 4), (4096, 11008, 8), (2112, 8256, 4), (11008, 4160, 4)])
def test_wgmma_split_tiles_leave_the_workspace_zero(y_sums, k, n, bits):
    """Every call whose tiles are split between blocks must leave the split-K accumulators and the
    tiles' counters zero, since the next call (of any layer) adds into them. Token counts over
    every tile size, with partly filled token quads (odd m); layers whose tiles split in two, and
    in many; also each call's result against the reference (_check). y_sums: at 17-128 tokens, where each
    tile is split over 4 blocks or more, the GEMM leaves its sums in the accumulators and sums_to_y
    zeroes them as it writes y."""
    if not cuda_backend.wgmma_available():
        pytest.skip("needs the sm_90a wgmma kernel")
    layer = cuda_layer(k, n, bits, 128, sym=False)
    ws = cuda_backend.workspace(torch.device("cuda"))
    with cuda_backend.gemm_launch_options(y_sums=y_sums):
        for m in (13, 16, 31, 57, 64, 97, 128, 131, 255):
            check(layer, (m,), torch.float16, ops=("gemm",))
            assert int(ws.accum_counters.abs().sum()) == 0, f"m={m}: tile counters left non-zero"
            assert float(ws.accum.abs().max()) == 0.0, f"m={m}: split-K accumulator left non-zero"


@pytest.mark.parametrize("y_sums", [True, False])
@pytest.mark.parametrize("m,tile_cols,per_sm", [(64, 128, 2), (128, 256, 1), (200, 128, 1)])
def test_wgmma_grids_of_whole_and_evenly_split_tiles(m, tile_cols, per_sm, y_sums):
    """Layers whose tile count lets the grid give each tile c blocks (aligned_blocks in
    gemm_wgmma_launch.cuh): as many tiles as blocks, a few fewer (whole tiles, some SMs idle), half
    and a third as many (c = 2, 3), and counts that stay on stream-K (a bit more than half the
    blocks, one tile over them), at 64 tokens (128-column tiles, two blocks an SM), 128 (a layer
    wider than 8192 columns: 256-column tiles, one block an SM) and 200 (256-token tiles of 128
    columns). Every tile is checked on its own, so a unit left out or taken twice shows, and the
    split-K accumulators and counters must be left zero. With fewer than 4 blocks a tile, whole tiles
    write y and split ones go through the fix-up; y_sums (on: from 4 blocks a tile at 17-128 tokens
    the GEMM leaves its sums and sums_to_y writes y) must not change that."""
    if not cuda_backend.wgmma_available():
        pytest.skip("needs the sm_90a wgmma kernel")
    blocks = torch.cuda.get_device_properties(0).multi_processor_count * per_sm
    ws = cuda_backend.workspace(torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(next_seed())
    for tiles in (blocks, blocks - blocks // 20, blocks // 2, blocks // 3, blocks // 2 + blocks // 5, blocks + 1):
        layer = cuda_layer(384, tile_cols * tiles - 40, 4, 128, sym=False)  # K: 3 stages; the last tile partial
        x = torch.randn(m, layer.in_features, device="cuda", dtype=torch.float16, generator=g)
        ref = kernels.reference(layer, x)
        out = torch.full((m, layer.out_features), float("nan"), device="cuda", dtype=torch.float16)
        with cuda_backend.gemm_launch_options(y_sums=y_sums):
            y = cuda_backend.matmul(layer.kernel_state, x, out=out, op="gemm").float()
        assert torch.isfinite(y).all(), f"tiles={tiles}: unwritten outputs"
        errs = [((y[:, c:c + tile_cols] - ref[:, c:c + tile_cols]).norm() / ref[:, c:c + tile_cols].norm()).item()
                for c in range(0, layer.out_features, tile_cols)]
        worst = max(range(len(errs)), key=errs.__getitem__)
        assert errs[worst] < TOL[torch.float16], f"tiles={tiles}: tile {worst} rel err {errs[worst]:.2e}"
        assert int(ws.accum_counters.abs().sum()) == 0, f"tiles={tiles}: tile counters left non-zero"
        assert float(ws.accum.abs().max()) == 0.0, f"tiles={tiles}: split-K accumulator left non-zero"


@pytest.mark.parametrize("pdl,y_sums", [(True, True), (False, True), (True, False)])
def test_chained_gemms_see_the_previous_output(pdl, y_sums):
    """Back-to-back GEMM calls on one stream, each reading the previous call's output (written into
    NaN-poisoned buffers) and sharing the split-K accumulators, eagerly and in a CUDA graph. With
    programmatic dependent launch a kernel copies its weights before the previous one has
    finished but must not read x or touch the accumulators until it has: a misplaced wait shows as
    NaN or a result that is not layer(previous output). y_sums: the calls of 17-128 tokens on layers
    split over 4 blocks a tile or more are two kernels each (the GEMM leaving sums, sums_to_y), both
    under the same rule."""
    layers = [cuda_layer(4096, 4096, 4, 128, sym=False), cuda_layer(4096, 11008, 4, 128),
              cuda_layer(11008, 4096, 4, 32, sym=False), cuda_layer(4096, 4096, 8, 64)]
    with cuda_backend.gemm_launch_options(pdl=pdl, y_sums=y_sums):
        for m in (24, 64, 100):
            x0 = torch.randn(m, 4096, device="cuda", dtype=torch.float16) * 0.01  # ~5x growth per layer
            chain_eager_and_graph(layers, x0, op="gemm")
