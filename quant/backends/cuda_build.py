"""How the "cuda" backend's extension `quantserve_cuda` (csrc/) is built: its sources and headers,
the GPU targets, and the spec that quant.ext.load JIT-builds at first use and that
`python -m quant.build_ext --only cuda` builds ahead of time (the Docker image).

Targets: QUANTSERVE_CUDA_ARCHS ("80;86;89;90a") when set; else the GPU of this machine (a JIT
build compiles only what it will run; sm_90 builds sm_90a, whose wgmma kernels need it); else,
with no GPU (an image build), every target the sources support. QUANTSERVE_CUDA_TRACE=1 builds the
diagnosis variant whose pipelined GEMV records a per-warp timeline (csrc/qs_trace.cuh,
bench/gemv_timeline.py) and whose wgmma GEMM records a per-block one (csrc/qs_gemm_trace.cuh,
bench/gemm_timeline.py); its flags are part of the build key, so it caches beside the normal build.
"""

from __future__ import annotations

import os

import torch

from quant.ext import ExtensionSpec

SOURCES = ("bindings.cpp", "gemv_f16.cu", "gemv_bf16.cu", "gemm_f16.cu", "gemm_bf16.cu", "dequant.cu",
           "gather.cu", "dispatch.cu")
HEADERS = ("quantserve_cuda.h", "qs_ptx.cuh", "qs_dequant.cuh", "qs_streamk.cuh", "qs_launch.cuh", "qs_stage.cuh",
           "qs_wgmma.cuh", "qs_probe.cuh", "gemm_wgmma.cuh", "gemm_wgmma_cfg.cuh", "gemm_wgmma_launch.cuh",
           "gemm_wgmma_out.cuh", "sums_to_y.cuh", "gemv.cuh", "gemv_chunk.cuh", "gemv_pipe.cuh", "gemm.cuh",
           "dequant.cuh", "qs_trace.cuh", "qs_gemm_trace.cuh", "gemm_wgmma_slots.cuh")
# Every target the sources support.
ALL_ARCHS = ("80", "86", "89", "90a")


def arch_flags(archs: tuple[str, ...]) -> tuple[str, ...]:
    """nvcc -gencode flags for `archs` ("80", "90a", ...); 90a also embeds plain sm_90 code."""
    flags = []
    for arch in archs:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if arch == "90a":
            flags.append("-gencode=arch=compute_90,code=sm_90")
    return tuple(flags)


def archs_for_build() -> tuple[str, ...]:
    """The targets of a build here (see the module docstring)."""
    env = os.environ.get("QUANTSERVE_CUDA_ARCHS")
    if env:
        return tuple(a.strip() for a in env.replace(",", ";").split(";") if a.strip())
    if not torch.cuda.is_available():
        return ALL_ARCHS
    major, minor = torch.cuda.get_device_capability()
    cc = f"{major}{minor}"
    return ("90a",) if cc == "90" else (cc,)


def extension_spec(archs: tuple[str, ...] | None = None) -> ExtensionSpec:
    """The spec of quantserve_cuda for `archs` (default: archs_for_build())."""
    # No -std flag: torch's cpp_extension picks the standard its headers were built with (C++20);
    # overriding it changes the layout of c10 types and crashes the error path.
    cuda_flags = ("-O3", "-lineinfo") + arch_flags(archs_for_build() if archs is None else archs)
    if os.environ.get("QUANTSERVE_CUDA_TRACE") == "1":  # diagnosis build: the GEMV's and GEMM's timelines
        cuda_flags += ("-DQS_GEMV_TRACE",)
    return ExtensionSpec(name="quantserve_cuda", sources=SOURCES, cuda=True, cflags=("-O3",),
                         cuda_cflags=cuda_flags, headers=HEADERS)
