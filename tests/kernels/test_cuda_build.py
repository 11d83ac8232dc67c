"""Every .cu in csrc/ compiles for sm_80 and sm_90a (CPU-only: needs nvcc, not a GPU).

A build break then fails CI, which has nvcc but no GPU. Files compile in parallel, one nvcc per
(file, arch); the two GEMM instantiation files take one arch each (same template), which keeps the
whole set under two minutes on two cores.
"""

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from quant.backends.cuda import SOURCES, arch_flags

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
    # gemm_f16.cu and gemm_bf16.cu instantiate the same template (gemm.cuh): one arch each covers
    # both archs for it and halves the longest compiles; every other file builds for both.
    gemm = [s for s in sources if s.name.startswith("gemm_")]
    jobs = [(s, arch) for s in sources if s not in gemm for arch in ("80", "90a")]
    jobs += [(s, ("80", "90a")[i % 2]) for i, s in enumerate(gemm)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _compile(job[0], job[1], tmp_path), jobs))
    failures = [f"{name}:\n{log}" for name, rc, log in results if rc != 0]
    assert not failures, "\n\n".join(failures)
