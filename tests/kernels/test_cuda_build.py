"""Every .cu in csrc/ compiles for sm_80 and sm_90a (CPU-only: needs nvcc, not a GPU); the build's
spec (quant.backends.cuda_build) names every source and header and picks its targets.

A build break then fails CI, which has nvcc but no GPU. Files compile in parallel, one nvcc per
(file, arch); each per-dtype instantiation file takes one arch (its pair covers the other), which keeps
the whole set under two minutes on two cores.
"""

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import torch

from quant.backends import cuda_build
from quant.backends.cuda_build import SOURCES, arch_flags

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NVCC = shutil.which("nvcc")


def _compile(source: Path, arch: str, out_dir: Path) -> tuple[str, int, str]:
    cmd = [NVCC, "-std=c++20", "-c", str(source), "-o", str(out_dir / f"{source.stem}-{arch}.o"),
           f"-I{CSRC}", "-Xptxas", "-O1", *arch_flags((arch,))[:1]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return f"{source.name} sm_{arch}", proc.returncode, (proc.stdout + proc.stderr)[-3000:]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.timeout(600)
def test_every_cu_file_compiles(tmp_path):
    sources = sorted(CSRC.glob("*.cu"))
    assert {s.name for s in sources} <= set(SOURCES), "a .cu file is missing from the extension's SOURCES"
    assert sources, "no .cu files found"
    # The *_f16.cu / *_bf16.cu pairs instantiate one template (gemv.cuh, gemm.cuh) per dtype: one
    # arch each still compiles every template for both archs and halves the longest compiles;
    # every other file builds for both.
    paired = [s for s in sources if s.stem.endswith(("_f16", "_bf16"))]
    jobs = [(s, arch) for s in paired for arch in (("80",) if s.stem.endswith("_f16") else ("90a",))]
    jobs += [(s, arch) for s in sources if s not in paired for arch in ("80", "90a")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _compile(job[0], job[1], tmp_path), jobs))
    failures = [f"{name}:\n{log}" for name, rc, log in results if rc != 0]
    assert not failures, "\n\n".join(failures)


def test_spec_lists_every_header_and_source():
    """A header missing from HEADERS would leave a JIT build stale after it changes."""
    headers = {p.name for p in CSRC.glob("*.cuh")} | {p.name for p in CSRC.glob("*.h")}
    assert set(cuda_build.HEADERS) == headers
    assert set(cuda_build.SOURCES) == {p.name for p in CSRC.glob("*.cu")} | {"bindings.cpp"}


def test_build_targets(monkeypatch):
    monkeypatch.setenv("QUANTSERVE_CUDA_ARCHS", "80, 90a")
    assert cuda_build.archs_for_build() == ("80", "90a")
    monkeypatch.delenv("QUANTSERVE_CUDA_ARCHS")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # an image build: no GPU
    assert cuda_build.archs_for_build() == cuda_build.ALL_ARCHS
    flags = cuda_build.extension_spec().cuda_cflags
    for arch in cuda_build.ALL_ARCHS:
        assert f"-gencode=arch=compute_{arch},code=sm_{arch}" in flags
    assert "-gencode=arch=compute_90,code=sm_90" in flags


def test_timing_probes_are_off_in_the_source():
    """The timing probes of csrc/qs_probe.cuh build kernels that compute wrong results (bench/ab.sh
    switches them on in a copy of the tree); the committed default must be off, and CI has no GPU
    whose tests would notice."""
    assert "\n#define QS_PROBE 0\n" in (CSRC / "qs_probe.cuh").read_text()


def test_python_limits_match_the_c_header():
    """The backend's token limits for calls that leave their sums repeat the C header's (the
    extension refuses larger calls, and the sums buffer is sized from the Python side): the two
    must agree, which CI checks here without a GPU."""
    from quant.backends import cuda

    header = (CSRC / "quantserve_cuda.h").read_text()

    def define(name: str) -> int:
        lines = [line.split() for line in header.splitlines() if line.startswith(f"#define {name} ")]
        assert len(lines) == 1, f"{name} is defined {len(lines)} times in quantserve_cuda.h"
        return int(lines[0][2])

    assert cuda.SUMS_MAX_M == define("QS_SUMS_MAX_M")
    assert cuda.GEMM_SUMS_MAX_M == define("QS_GEMM_SUMS_MAX_M")
