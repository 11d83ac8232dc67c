"""How long the start-up self-check takes and how close the served path is to the reference.

    python bench/selfcheck.py [--model default] [--device auto] [--dtypes float32,bfloat16]

For each activation dtype: loads the model, builds the engine, runs the self-check twice (the
first run includes the kernels' one-time warm-up, e.g. the dense backend's dequantisation, which
the first request would otherwise pay), and prints the seconds, the worst kernel relative error
per backend, and the golden decode's logprob agreement against its tolerance (the margin that
keeps fp16/bf16 rounding from raising a false alarm). Writes bench/results/selfcheck-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.config import EngineConfig  # noqa: E402
from server.engine.engine import LLMEngine  # noqa: E402
from server.loader import load_model  # noqa: E402
from server.selfcheck import run_self_check  # noqa: E402
from server.serve import eos_token_ids  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtypes", default=None, help="default: float32 on CPU, float16,bfloat16 on CUDA")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    dtypes = a.dtypes or ("float16,bfloat16" if torch.cuda.is_available() and a.device != "cpu"
                          else "float32")
    for dtype in dtypes.split(","):
        loaded = load_model(a.model, device=a.device, dtype=dtype,
                            cache_dir=Path(a.cache_dir) if a.cache_dir else None)
        engine = LLMEngine(loaded.model, EngineConfig(kv_cache_gb=0.25), eos_token_ids(loaded))
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            report = run_self_check(engine, loaded.tokenizer)
            times.append(time.perf_counter() - t0)
        g = report.golden
        row = {"model": loaded.name, "dtype": dtype, "device": device_name(loaded.model.device),
               "layers": report.layers_checked, "backends": loaded.backends,
               "first_s": round(times[0], 3), "steady_s": round(times[1], 3),
               "max_rel_error": report.max_rel_error, "golden_max_logprob_diff": g.max_logprob_diff,
               "golden_max_greedy_gap": g.max_greedy_gap, "golden_tolerance": g.tolerance,
               "golden_argmax_agreement": g.argmax_agreement}
        rows.append(row)
        print(f"{loaded.name} {dtype} on {row['device']} ({loaded.backends}): self-check "
              f"{times[0]:.2f}s first, {times[1]:.2f}s again; worst kernel rel error "
              f"{ {k: f'{v:.2g}' for k, v in report.max_rel_error.items()} }; golden |dlogprob| "
              f"{g.max_logprob_diff:.3g} nats = {g.max_logprob_diff / g.tolerance:.1%} of the "
              f"tolerance {g.tolerance}")
    out = ROOT / "bench" / "results" / f"selfcheck-{rows[0]['device'].replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
