"""`python -m quant.build_ext`: build every compiled extension the package declares, ahead of time.

A module of the `quant` package or its subpackages declares an extension by defining
`extension_spec()` (one `quant.ext.ExtensionSpec`) or `extension_specs()` (several). This command
imports every such module, collects those specs and builds each one; it exits non-zero if any
build fails, if a module cannot be imported, or if a name given with --expect is not declared.

Two ways to build:
    (default)     JIT-build into the extension cache (`quant.ext.cache_dir()`), exactly as the
                  first use would: warms the cache of this machine.
    --out DIR     compile each extension with setuptools + torch's BuildExtension into DIR as an
                  importable module (`<name>.cpython-*.so`), without importing it (no GPU or driver
                  needed). Put DIR on sys.path (e.g. site-packages) and `quant.ext.load` uses the
                  prebuilt module. This is how the Docker image gets its CUDA kernels, with
                  TORCH_CUDA_ARCH_LIST naming the GPU architectures (e.g. "8.0;8.6;8.9;9.0a").
                  CPU extensions compiled with -march=native are skipped here: a copy built for
                  the build machine's CPU may not run on another; they JIT-build on first use.

    python -m quant.build_ext --list
    TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0a" python -m quant.build_ext --only cuda \\
        --out "$(python -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')" \\
        --expect quantserve_cuda
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Iterable

from quant import ext

log = logging.getLogger("quantserve.build_ext")


class DiscoveryError(RuntimeError):
    """A module of the package could not be imported, or declared something that is no spec."""


def package_modules() -> list[ModuleType]:
    """Every module of the `quant` package and its subpackages (quant.backends) except this one,
    imported."""
    import quant

    modules = []
    for info in sorted(pkgutil.walk_packages(quant.__path__, prefix="quant."), key=lambda i: i.name):
        if info.name == "quant.build_ext" or info.ispkg:
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except Exception as exc:
            raise DiscoveryError(f"cannot import {info.name}: {type(exc).__name__}: {exc}") from exc
    return modules


def discover(modules: Iterable[ModuleType] | None = None) -> list[ext.ExtensionSpec]:
    """The specs declared by `modules` (default: the package's), in module order, unique by name."""
    specs: dict[str, ext.ExtensionSpec] = {}
    for module in package_modules() if modules is None else modules:
        found = []
        if callable(getattr(module, "extension_spec", None)):
            found.append(module.extension_spec())
        if callable(getattr(module, "extension_specs", None)):
            found.extend(module.extension_specs())
        for spec in found:
            if not isinstance(spec, ext.ExtensionSpec):
                raise DiscoveryError(f"{module.__name__} declared {spec!r}, not an ExtensionSpec")
            specs.setdefault(spec.name, spec)
    return list(specs.values())


def machine_specific(spec: ext.ExtensionSpec) -> bool:
    return any(flag.startswith(("-march=native", "-mcpu=native", "-mtune=native"))
               for flag in spec.cflags)


def build_into(spec: ext.ExtensionSpec, out: Path) -> Path:
    """Compile `spec` into `out` as an importable module (not imported); returns the .so path."""
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = [str(ext.CSRC / s) for s in spec.sources]
    args = {"cxx": list(spec.cflags)}
    kind = CppExtension
    if spec.cuda:
        args["nvcc"] = list(spec.cuda_cflags)
        kind = CUDAExtension
    extension = kind(name=spec.name, sources=sources, include_dirs=[str(ext.CSRC)],
                     extra_compile_args=args, extra_link_args=list(spec.ldflags))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix=f"{spec.name}-build-") as tmp:
        os.chdir(tmp)  # so setuptools reads no pyproject.toml / setup.cfg of the caller's cwd
        try:
            setup(name=f"{spec.name}-prebuilt", ext_modules=[extension],
                  cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
                  script_args=["-q", "build_ext", "--build-lib", str(out), "--build-temp", tmp])
        except SystemExit as exc:  # distutils reports a failed compile this way
            raise ext.ExtensionError(f"building {spec.name} failed: {exc}") from None
        finally:
            os.chdir(cwd)
    built = sorted(out.glob(f"{spec.name}*.so"), key=lambda p: p.stat().st_mtime)
    if not built:
        raise ext.ExtensionError(f"building {spec.name} produced no {spec.name}*.so in {out}")
    return built[-1]


def build(spec: ext.ExtensionSpec, out: Path | None) -> str:
    """Build one spec; returns what was done (one line)."""
    t0 = time.perf_counter()
    if out is None:
        ext.load(spec)
        where = str(ext.cache_dir())
    else:
        where = str(build_into(spec, out))
    return f"{spec.name}: built in {time.perf_counter() - t0:.0f}s -> {where}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quant.build_ext", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["all", "cuda", "cpu"], default="all",
                   help="which extensions to build (default: all)")
    p.add_argument("--out", type=Path, default=None,
                   help="compile into this directory as importable modules instead of the JIT cache")
    p.add_argument("--expect", action="append", default=[], metavar="NAME",
                   help="fail unless an extension of this name is declared and selected (repeatable)")
    p.add_argument("--list", action="store_true", help="list the declared extensions and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        specs = discover()
    except DiscoveryError as exc:
        print(f"build_ext: error: {exc}", file=sys.stderr)
        return 1
    selected = [s for s in specs if args.only == "all" or (args.only == "cuda") == s.cuda]
    if args.list:
        for s in specs:
            print(f"{s.name}\t{'cuda' if s.cuda else 'cpu'}\t{' '.join(s.sources)}")
        return 0
    missing = [n for n in args.expect if n not in {s.name for s in selected}]
    if missing:
        print(f"build_ext: error: expected extension(s) {missing} are not declared (--only "
              f"{args.only} found {[s.name for s in selected]})", file=sys.stderr)
        return 1
    if not selected:
        print(f"build_ext: no {args.only if args.only != 'all' else ''} extensions declared; "
              f"nothing to build")
        return 0
    if any(s.cuda for s in selected):
        print(f"build_ext: TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(unset)')}")
    failed = 0
    for spec in selected:
        if args.out is not None and machine_specific(spec):
            print(f"{spec.name}: skipped with --out (built with -march=native for this CPU; it "
                  f"JIT-builds on first use on the machine that runs it)")
            continue
        try:
            print(build(spec, args.out), flush=True)
        except Exception as exc:
            failed += 1
            print(f"build_ext: error: {spec.name}: {exc}", file=sys.stderr)
    if failed:
        print(f"build_ext: {failed} of {len(selected)} extension(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
