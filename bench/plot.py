"""PNG plots from bench/results/*.json (run where matplotlib is installed: pip install matplotlib).

    python -m bench.plot            # every decode-* and serving-* result that has no PNG yet
    python -m bench.plot FILE.json  # one result
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import RESULTS


def plot_serving(data: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    rows = data["results"]
    c = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(c, [r["tokens_per_s"] for r in rows], "o-")
    a.set(xscale="log", xlabel="concurrent streams", ylabel="generated tokens/s",
          title="aggregate throughput")
    for key, label in (("ttft_p50_s", "TTFT p50"), ("ttft_p99_s", "TTFT p99"),
                       ("itl_p50_s", "ITL p50"), ("itl_p99_s", "ITL p99")):
        b.plot(c, [r[key] * 1e3 for r in rows], "o-", label=label)
    b.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="ms", title="latency")
    b.legend()
    fig.suptitle(f"{data.get('model')} on {data['device']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_decode(data: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    rows = data["results"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant in sorted({r["variant"] for r in rows}):
        rs = [r for r in rows if r["variant"] == variant]
        ax.plot([r["batch"] for r in rs], [r["tokens_per_s"] for r in rs], "o-", label=variant)
    rs = [r for r in rows if r["variant"] == "int4"]
    if rs and "roofline_tokens_per_s" in rs[0]:
        ax.plot([r["batch"] for r in rs], [r["roofline_tokens_per_s"] for r in rs], "k--",
                label="int4 bandwidth roofline")
    ax.set(xscale="log", yscale="log", xlabel="batch (concurrent sequences)", ylabel="tokens/s",
           title=f"decode, {data.get('preset', data.get('model'))} on {data['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot(path: Path) -> Path | None:
    data = json.loads(path.read_text())
    out = path.with_suffix(".png")
    if path.name.startswith("serving-"):
        plot_serving(data, out)
    elif path.name.startswith("decode-") and "results" in data and data["results"] \
            and "batch" in data["results"][0]:
        plot_decode(data, out)
    else:
        return None
    return out


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]] or [
        p for p in sorted(RESULTS.glob("*.json"))
        if p.name.startswith(("serving-", "decode-")) and not p.with_suffix(".png").exists()]
    for p in paths:
        out = plot(p)
        if out:
            print("wrote", out)


if __name__ == "__main__":
    main()
