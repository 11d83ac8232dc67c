"""A few GEMV / GEMM cases sized for compute-sanitizer (not collected by pytest):

    compute-sanitizer --tool memcheck python -m tests.kernels.sanitize_cuda

Covers full and split (stream-K) tiles, partial strips and k steps, asym zeros, act-order (the gather
kernel before the GEMV, GEMM and dequant path), bias, the GEMV and the wgmma GEMM that leave their sums
(up to 16 / 128 tokens; also as a column reader's projection asks, where that takes the other kernel),
the wgmma GEMM writing y through its sums and sums_to_y, and again through its own fix-up,
fp16 and bf16; calls above 32 tokens also run the dequantise + cuBLAS path. Exits non-zero if a result is wrong.
"""

import sys

import torch

from quant import kernels
from quant.backends import cuda as cuda_backend
from quant.format import FORMAT_V2
from tests.kernels.layers import random_layer

CASES = [  # k, n, bits, group_size, sym, desc_act, bias, ms
    (576, 192, 4, 128, True, False, False, (1, 16, 64, 100, 256)),
    (584, 72, 8, 64, False, False, True, (3, 33)),
    (4096, 4096, 4, 128, True, False, False, (1, 9, 64, 130, 300)),
    (1536, 576, 4, 32, False, True, True, (2, 40)),
    (576, 192, 8, 64, True, True, False, (1, 12, 24)),  # act-order: the gather kernel before each kernel
    (256, 128, 3, 64, False, False, False, (5, 20)),
    (11008, 256, 4, 128, True, True, False, (3, 64)),  # act-order, K = 11008
    (1536, 200, 4, 128, False, False, True, (1, 7, 13)),  # 4-bit asym g128: the pipelined GEMV with zeros
]


def main() -> int:
    bad = _run(fixup=False)
    with cuda_backend.gemm_launch_options(y_sums=False):
        bad += _run(fixup=True)
    torch.cuda.synchronize()
    print("sanitize cases:", "all ok" if bad == 0 else f"{bad} wrong")
    return 1 if bad else 0


def _run(fixup: bool) -> int:
    """The cases' wrong results. fixup: only the wgmma GEMM writing y at up to 128 tokens, with the
    y_sums option off (its own split-K fix-up; with it on, the GEMM leaves sums and sums_to_y
    writes y)."""
    bad = 0
    for i, (k, n, bits, gs, sym, act, bias, ms) in enumerate(CASES):
        if fixup and not cuda_backend.wgmma_available():
            break
        layer = random_layer(k, n, bits, gs, sym, FORMAT_V2, act, bias, seed=100 + i, device="cuda")
        assert layer.prepare("cuda") == "cuda"
        for dtype in (torch.float16, torch.bfloat16):
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                ref = kernels.reference(layer, x)
                ops = ("gemv", "gemm") if m <= 32 else ("gemm", "dequant")
                sums_ops = {"sums": cuda_backend.sums_op(m, layer.kernel_state, x.device),
                            # a projection whose reader takes [column][slot] sums (q/k/v, gate/up)
                            "sums_cols": cuda_backend.sums_op(m, layer.kernel_state, x.device, columns=True)}
                if sums_ops["sums_cols"] == sums_ops["sums"]:
                    del sums_ops["sums_cols"]
                if not bias:
                    ops += tuple(name for name, kernel in sums_ops.items() if kernel is not None)
                if fixup:
                    ops = ("gemm",) if cuda_backend.WGMMA_MIN_M <= m <= cuda_backend.GEMM_SUMS_MAX_M else ()
                for op in ops:
                    if op in sums_ops:  # the GEMV or wgmma GEMM that leaves its fp32 sums, converted here
                        y = cuda_backend.matmul_sums(layer.kernel_state, x, sums_ops[op]).materialize()
                    else:
                        y = cuda_backend.matmul(layer.kernel_state, x, op=op)
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    ok = bool(torch.isfinite(y).all()) and err < (2e-3 if dtype == torch.float16 else 1.2e-2)
                    bad += not ok
                    print(f"k={k} n={n} bits={bits} g={gs} m={m} {op}{' fixup' if fixup else ''} "
                          f"{str(dtype)[6:]}: err={err:.2e} {'ok' if ok else 'WRONG'}")
    return bad


if __name__ == "__main__":
    sys.exit(main())
