"""`python -m quant.build_ext`: finds declared extensions, compiles them into an importable
module without importing, and exits non-zero on a failed build or a missing expected one."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types

import pytest

from quant import build_ext, ext

MODULE = "qs_build_ext_probe"
SOURCE = """
#include <Python.h>
static PyModuleDef probe = {PyModuleDef_HEAD_INIT, "%s", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit_%s(void) {
  PyObject* m = PyModule_Create(&probe);
  PyModule_AddIntConstant(m, "answer", 42);
  return m;
}
""" % (MODULE, MODULE)


def _spec(path, name=MODULE, cflags=()):
    return ext.ExtensionSpec(name=name, sources=(str(path),), cflags=tuple(cflags))


def test_discover_collects_specs_from_modules():
    a = types.ModuleType("quant.fake_a")
    a.extension_spec = lambda: ext.ExtensionSpec("one", ("x.cpp",))
    b = types.ModuleType("quant.fake_b")
    b.extension_specs = lambda: [ext.ExtensionSpec("two", ("y.cu",), cuda=True),
                                 ext.ExtensionSpec("one", ("x.cpp",))]
    c = types.ModuleType("quant.fake_c")  # declares nothing
    assert [s.name for s in build_ext.discover([a, b, c])] == ["one", "two"]
    bad = types.ModuleType("quant.fake_bad")
    bad.extension_spec = lambda: "not a spec"
    with pytest.raises(build_ext.DiscoveryError, match="not an ExtensionSpec"):
        build_ext.discover([bad])


def test_the_package_imports_and_lists():
    out = subprocess.run([sys.executable, "-m", "quant.build_ext", "--list"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    declared = {line.split("\t")[0] for line in out.stdout.splitlines()}
    assert declared == {s.name for s in build_ext.discover()}
    # The Docker image builds `--only cuda --expect quantserve_cuda`: the CUDA backend, in the
    # quant.backends subpackage, must be found, as a CUDA extension.
    kinds = dict(line.split("\t")[:2] for line in out.stdout.splitlines())
    assert kinds.get("quantserve_cuda") == "cuda" and kinds.get("quantserve_cpu") == "cpu", out.stdout


def test_expect_fails_when_the_extension_is_not_declared():
    out = subprocess.run([sys.executable, "-m", "quant.build_ext", "--only", "cuda", "--out",
                          "/nonexistent", "--expect", "no_such_extension"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and "no_such_extension" in out.stderr


def test_build_into_makes_an_importable_module(tmp_path, monkeypatch):
    src = tmp_path / "probe.cpp"
    src.write_text(SOURCE)
    out = tmp_path / "site"
    so = build_ext.build_into(_spec(src), out)
    assert so.parent == out and so.name.startswith(MODULE)
    monkeypatch.syspath_prepend(str(out))
    assert importlib.import_module(MODULE).answer == 42


def test_main_exits_nonzero_on_a_compile_error(tmp_path, monkeypatch, capsys):
    good, bad = tmp_path / "good.cpp", tmp_path / "bad.cpp"
    good.write_text(SOURCE.replace(MODULE, "qs_probe_good"))
    bad.write_text("this is not C++;\n")
    native = _spec(good, "qs_probe_native", ["-march=native"])
    monkeypatch.setattr(build_ext, "discover", lambda: [_spec(good, "qs_probe_good"),
                                                        _spec(bad, "qs_probe_bad"), native])
    assert build_ext.main(["--out", str(tmp_path / "site")]) == 1
    captured = capsys.readouterr()
    assert "qs_probe_bad" in captured.err and "1 of 3 extension(s) failed" in captured.err
    assert "qs_probe_native: skipped with --out" in captured.out
    assert list((tmp_path / "site").glob("qs_probe_good*.so"))


def test_a_build_killed_midway_does_not_hang_the_next_load(tmp_path):
    """torch marks a JIT build in progress with a `lock` file in the build directory; a process
    killed mid-build leaves it, and torch's load then waits on it forever. The next load must
    notice it is stale (no quantserve builder holds the directory), remove it with a warning,
    build and load."""
    name = "qs_stale_lock_probe"
    src = tmp_path / "probe.cpp"
    src.write_text(SOURCE.replace(MODULE, name))
    env = {**os.environ, "QUANTSERVE_EXT_DIR": str(tmp_path / "ext")}
    spec = _spec(src, name)
    build_dir = tmp_path / "ext" / f"{name}-{ext.build_key(spec)}"
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()  # what a build killed by SIGKILL leaves behind
    code = ("from quant import ext; "
            f"print(ext.load(ext.ExtensionSpec(name={name!r}, sources=({str(src)!r},))).answer)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "42"
    assert "left by a build that did not finish" in out.stderr
    assert not (build_dir / "lock").exists()
