"""Build and load the compiled extensions in csrc/ (torch cpp_extension + ninja, JIT at first use).

An extension is built once into a cache directory keyed by its sources, flags, torch version and
machine (so a `-march=native` build never runs on a different CPU), and loaded from there
afterwards. A prebuilt module importable under the same name (wheel, Docker image) wins over the
JIT build. One log line says what was built or loaded; failures raise ExtensionError with the
compiler's last lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import logging
import os
import platform
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

log = logging.getLogger("quantserve.ext")

CSRC = Path(__file__).resolve().parent.parent / "csrc"
_LOADED: dict[str, ModuleType] = {}


class ExtensionError(RuntimeError):
    """The extension could not be built or loaded; the message says why and what to install."""


@dataclass(frozen=True)
class ExtensionSpec:
    name: str  # importable module name, e.g. "quantserve_cpu"
    sources: tuple[str, ...]  # paths relative to csrc/
    cuda: bool = False
    cflags: tuple[str, ...] = ()
    cuda_cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    headers: tuple[str, ...] = field(default=())  # relative to csrc/, only for the cache key


def cache_dir() -> Path:
    base = os.environ.get("QUANTSERVE_EXT_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "quantserve" / "extensions"


def _cpu_signature() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
    except OSError:
        pass
    return platform.machine() + flags


def build_key(spec: ExtensionSpec) -> str:
    import torch

    h = hashlib.sha256()
    for rel in spec.sources + spec.headers:
        h.update(rel.encode())
        h.update((CSRC / rel).read_bytes())
    h.update(repr((spec.cflags, spec.cuda_cflags, spec.ldflags, torch.__version__,
                   torch.version.cuda, _cpu_signature())).encode())
    return h.hexdigest()[:16]


def load(spec: ExtensionSpec) -> ModuleType:
    """Import the prebuilt module, else JIT-build it with ninja into the cache and import it."""
    if spec.name in _LOADED:
        return _LOADED[spec.name]
    try:
        module = importlib.import_module(spec.name)
        log.info("kernels: using prebuilt extension %s", spec.name)
        _LOADED[spec.name] = module
        return module
    except ImportError:
        pass
    if shutil.which("ninja") is None and not _ninja_module_available():
        raise ExtensionError(f"cannot build {spec.name}: ninja is not installed (pip install ninja)")
    if spec.cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None or shutil.which("nvcc") is None and not (Path(CUDA_HOME) / "bin/nvcc").exists():
            raise ExtensionError(f"cannot build {spec.name}: nvcc not found (install the CUDA toolkit "
                                 f"matching torch's CUDA {_torch_cuda()} or set CUDA_HOME)")
    from torch.utils import cpp_extension

    build_dir = cache_dir() / f"{spec.name}-{build_key(spec)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    fresh = not any(build_dir.glob(f"{spec.name}*.so"))
    try:
        with _builder_lock(build_dir):
            module = cpp_extension.load(
                name=spec.name,
                sources=[str(CSRC / s) for s in spec.sources],
                extra_cflags=list(spec.cflags),
                extra_cuda_cflags=list(spec.cuda_cflags),
                extra_ldflags=list(spec.ldflags),
                extra_include_paths=[str(CSRC)],
                build_directory=str(build_dir),
                with_cuda=spec.cuda,
                verbose=False,
            )
    except Exception as exc:  # the compiler output is in the exception text
        tail = "\n".join(str(exc).strip().splitlines()[-15:])
        raise ExtensionError(f"building {spec.name} failed in {build_dir}:\n{tail}") from exc
    log.info("kernels: %s extension %s (%s)", "built" if fresh else "loaded cached", spec.name,
             build_dir)
    _LOADED[spec.name] = module
    return module


@contextlib.contextmanager
def _builder_lock(build_dir: Path) -> Iterator[None]:
    """Held (an flock on `build_dir/.builder`) by whoever runs torch's build or load in `build_dir`.

    torch marks a build in progress with a `lock` file it deletes when done; a process killed
    mid-build by a signal Python does not turn into an exception (SIGTERM before the server's
    handlers exist, SIGKILL: an OOM kill, a pod stopped or evicted) leaves it behind, and every
    later start then waits on it forever without a word. Every quantserve process takes this flock
    first, and the kernel drops an flock with its holder, so a `lock` file found while holding it
    is such a leftover: it is removed (with a warning) and the build runs again.
    """
    with open(build_dir / ".builder", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        baton = build_dir / "lock"
        if baton.exists():
            log.warning("kernels: removing %s, left by a build that did not finish; building again", baton)
            baton.unlink(missing_ok=True)
        yield


def _ninja_module_available() -> bool:
    try:
        import ninja  # noqa: F401

        bin_dir = Path(ninja.BIN_DIR)
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        return True
    except (ImportError, AttributeError):
        return False


def _torch_cuda() -> str:
    import torch

    return str(torch.version.cuda)
