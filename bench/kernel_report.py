"""What bench/kernels.py reports from its rows: the CUDA issue's targets (met or missed, with the
measured value) and the decode-step plot."""

from __future__ import annotations


def targets(steps, rows, copy_bw):
    """The CUDA issue's targets, each with its measured value and whether it is met."""
    def step(backend, m):
        v = [s["ms"] for s in steps if s["backend"] == backend and s["m"] == m]
        return v[0] if v else None

    out = []

    def add(name, value, ok):
        out.append({"target": name, "measured": value, "met": bool(ok) if value is not None else None})

    o1, f1, t1 = step("ours", 1), step("cublas_fp16", 1), step("torch_int4", 1)
    add("step M=1 <= 1.3 ms", o1, o1 is not None and o1 <= 1.3)
    if o1 and f1:
        add("step M=1 >= 3.8x fp16", round(f1 / o1, 2), f1 / o1 >= 3.8)
    if o1 and t1:
        add("step M=1 >= 1.5x torch int4", round(t1 / o1, 2), t1 / o1 >= 1.5)
    for m, limit in ((16, 1.5), (64, 2.6), (128, 4.3)):
        v = step("ours", m)
        add(f"step M={m} <= {limit} ms", v, v is not None and v <= limit)
    o128, f128 = step("ours", 128), step("cublas_fp16", 128)
    if o128 and f128:
        add("step M=128 faster than fp16", round(f128 / o128, 2), o128 < f128)
    o256, f256 = step("ours", 256), step("cublas_fp16", 256)
    if o256 and f256:
        add("step M=256 <= 1.1x fp16", round(o256 / f256, 2), o256 <= 1.1 * f256)
    g = [r for r in rows if r["backend"] == "ours" and r["layer"] == "o" and r["m"] == 1]
    if g:
        frac = g[0]["tbs"] / copy_bw
        add("4096x4096 GEMV >= 70% of copy bandwidth", round(frac, 3), frac >= 0.70)
    return out


def plot(steps, copy_bw, path, gpu, int4_bytes: int) -> bool:
    """Step ms against M per backend, log-log, with the int4 bytes / copy bandwidth floor; False
    where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend in ("ours", "cublas_fp16", "torch_int4"):
        pts = sorted((s["m"], s["ms"]) for s in steps if s["backend"] == backend)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=backend)
    ax.axhline(int4_bytes / copy_bw / 1e9, color="gray", ls="--", label="int4 bytes / copy bandwidth")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("ms per decode step (all linears)")
    ax.set_title(f"Llama-2-7B linears, {gpu}")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True
