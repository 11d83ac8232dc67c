"""CPU int4 matmul, one layer at a time: cpu_int4 against the library ops and dense torch.

    python bench/cpu_kernels.py [--threads N] [--out bench/results/cpu-kernels-<cpu>.json]

Contenders, same shapes, same run (times are the best of several repeats, in microseconds):
  ours_f32 / ours_bf16   cpu_int4 (4-bit g64, int8 activations) with float32 / bfloat16 x
  int4pack_bf16 / _f32   torch.ops.aten._weight_int4pack_mm_for_cpu (tinygemm layout, 4-bit g64)
  dynquant_f32           torch.ops.aten._dyn_quant_matmul_4bit (KleidiAI on Arm; a fallback on x86)
  dense_f32 / dense_bf16 F.linear on the dequantised weight
Shapes are SmolLM2-135M's (K x N: 576x192, 576x576, 576x1536, 1536x576, lm_head 576x49152) and a
4096x4096 Llama-7B-class layer; M = 1 (decode), 16, 512 (prefill).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quant import cpu_int4  # noqa: E402
from quant.format import QuantConfig  # noqa: E402
from quant.linear import QuantLinear  # noqa: E402
from quant.pack import unpack_qweight  # noqa: E402

SHAPES = [(576, 192), (576, 576), (576, 1536), (1536, 576), (576, 49152), (4096, 4096)]
GROUP = 64


def timed(fn, budget_s: float = 0.4, repeats: int = 5) -> float:
    """Best per-call microseconds over `repeats` batches of calls lasting ~budget_s/repeats each."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, int(budget_s / repeats / once))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def random_layer(k: int, n: int) -> QuantLinear:
    g = torch.Generator().manual_seed(k * 7 + n)
    layer = QuantLinear(k, n, 4, GROUP, checkpoint_format="gptq", sym=True)
    layer.qweight.copy_(torch.randint(-2**31, 2**31, layer.qweight.shape, generator=g,
                                      dtype=torch.int64).to(torch.int32))
    layer.qzeros.fill_(0x77777777)  # symmetric v1: TRUE zero 8
    layer.scales.copy_((torch.rand(layer.scales.shape, generator=g) * 0.01 + 0.001).half())
    layer.g_idx.copy_((torch.arange(k) // GROUP).to(torch.int32))
    return layer


def contenders(layer: QuantLinear) -> dict:
    k, n = layer.in_features, layer.out_features
    layer.prepare("cpu_int4")
    state = layer.kernel_state
    w = layer.dequantize(torch.float32)  # [N, K]
    wb = w.bfloat16()
    codes = unpack_qweight(layer.qweight, 4, k).t().contiguous()  # [N, K] 0..15
    scales = layer.scales.float()  # [G, N]
    # tinygemm convention: w = (q - 8) * scale + zero, here zero = 0 (symmetric)
    sz = torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous()  # [G, N, 2]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    u8 = codes.to(torch.uint8)
    dyn = torch.ops.aten._dyn_quant_pack_4bit_weight((u8[:, ::2] | (u8[:, 1::2] << 4)).contiguous(),
                                                     scales.t().contiguous(), None, GROUP, k, n)
    return {
        "ours_f32": lambda x: cpu_int4.gemm(state, x, n),
        "ours_bf16": lambda x: cpu_int4.gemm(state, x.bfloat16(), n),
        "int4pack_bf16": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, GROUP,
                                                                             sz.bfloat16()),
        "int4pack_f32": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz),
        "dynquant_f32": lambda x: torch.ops.aten._dyn_quant_matmul_4bit(x, dyn, GROUP, k, n),
        "dense_f32": lambda x: F.linear(x, w),
        "dense_bf16": lambda x: F.linear(x.bfloat16(), wb),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ms", default="1,16,512")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "bench"))
    from cpu import machine_info

    info = machine_info()
    print(f"# {info['cpu']}, {info['cores']} cores, {torch.get_num_threads()} threads, torch {info['torch']}, "
          f"cpu_int4 path {cpu_int4.ISA_NAMES[cpu_int4.module().best_isa()]}")
    rows = []
    with torch.inference_mode():
        for k, n in SHAPES:
            fns = contenders(random_layer(k, n))
            for m in [int(v) for v in args.ms.split(",")]:
                if m > 16 and n > 4096:
                    continue  # the lm_head only runs for the last token
                x = torch.randn(m, k)
                row = {"k": k, "n": n, "m": m}
                for name, fn in fns.items():
                    if name.startswith("dynquant") and m > 16:
                        continue  # reference fallback on x86: minutes at prefill sizes
                    row[name] = round(timed(lambda: fn(x)), 1)
                weight_gb = k * n / 2 / 1e9
                row["ours_f32_GBps" if m == 1 else "ours_f32_GMACps"] = round(
                    weight_gb / (row["ours_f32"] * 1e-6) if m == 1 else m * k * n / row["ours_f32"] / 1e3, 1)
                rows.append(row)
                best_lib = min(v for kk, v in row.items() if kk.startswith(("int4pack", "dynquant", "dense")))
                print(f"K={k:5d} N={n:5d} M={m:3d}  " + "  ".join(
                    f"{kk}={v}" for kk, v in row.items() if kk not in ("k", "n", "m"))
                      + f"  | ours_f32 x{best_lib / row['ours_f32']:.2f} vs best other", flush=True)
    slug = "".join(c if c.isalnum() else "-" for c in info["cpu"].lower()).strip("-")
    path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"cpu-kernels-{slug}-{info['cores']}c.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    import os

    path.write_text(json.dumps({"machine": info, "threads": torch.get_num_threads(), "group_size": GROUP,
                                "load_average": os.getloadavg(), "unit": "microseconds per call",
                                "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
