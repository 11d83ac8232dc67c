"""GPTQ quantisation time and peak GPU memory on a model shape (random weights: the time of GPTQ
does not depend on their values), per stage: capture, block forwards, Hessians, solve, pack, write.

    python -m bench.quantize --preset llama-2-7b --num-samples 128 --seq-len 2048 --group-size 128

The float model is built on the device in fp16 and kept on the CPU; the driver moves one decoder
block at a time to the GPU (quant/calibrate.py), so peak VRAM is one block plus the calibration
activations, not the model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import device_name, write_result
from quant.calibrate import quantize_model
from quant.checkpoint import save_checkpoint
from quant.format import QuantConfig
from server.dummy import build_dummy_model, dummy_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--desc-act", action="store_true")
    p.add_argument("--out", default=None, help="where to write the checkpoint (default: a temp dir)")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = dummy_config(args.preset)
    t0 = time.perf_counter()
    model = build_dummy_model(config, None, device, torch.float16 if device.type == "cuda"
                              else torch.float32).to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    build_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    calibration = torch.randint(0, vocab, (args.num_samples, args.seq_len),
                                generator=torch.Generator().manual_seed(0))
    qcfg = QuantConfig(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act)
    t0 = time.perf_counter()
    report = quantize_model(model, qcfg, "gptq", calibration, device=device, progress=True)
    quant_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    peak_reserved = torch.cuda.max_memory_reserved() if device.type == "cuda" else 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "ckpt"
        t0 = time.perf_counter()
        state = model.state_dict()
        save_checkpoint(out, state, config, qcfg)
        write_s = time.perf_counter() - t0
    stages = report.times.as_dict()
    stages["write"] = round(write_s, 3)
    total = quant_s + write_s
    payload = {"preset": args.preset, "num_samples": args.num_samples, "seq_len": args.seq_len,
               "bits": args.bits, "group_size": args.group_size, "desc_act": args.desc_act,
               "quantize_seconds": round(quant_s, 2), "total_seconds": round(total, 2),
               "build_float_model_seconds": round(build_s, 2), "stages_seconds": stages,
               "peak_vram_allocated_bytes": peak, "peak_vram_reserved_bytes": peak_reserved,
               "layers": len(report.layers), "order": report.order}
    path = write_result(f"quantize-{args.preset}", payload)
    print(f"GPTQ {args.bits}-bit g{args.group_size} of {args.preset} ({args.num_samples} x "
          f"{args.seq_len} tokens): {quant_s:.1f} s + write {write_s:.1f} s = {total:.1f} s, "
          f"peak VRAM {peak / 2**30:.2f} GiB allocated / {peak_reserved / 2**30:.2f} GiB reserved")
    print("stages:", stages)
    print("wrote", path, "on", device_name())


if __name__ == "__main__":
    main()
