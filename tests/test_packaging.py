"""The built wheel carries every file the fused CPU kernel's build reads, and the kernel runs from it.

The wheel is built from a copy of the checkout (no build isolation: offline), installed (not
editable) into a fresh virtual environment, and run from a directory outside the checkout with
this environment's site-packages on PYTHONPATH for the dependencies (jax, flax, …): a PYTHONPATH
directory does not read .pth files, so the editable install of the checkout stays invisible, which
the subprocess asserts (`loopicl.__file__` lies in the fresh environment).  Each run of it builds
the kernel into its own cache directory ($LOOPICL_KERNEL_CACHE), so a cached build cannot hide a
file missing from the wheel.  Time on 2 cores: ~25 s, ~10 s of it the C++ build.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest

from loopicl import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "loopicl", "kernels")
# Not part of a checkout's sources: never copied into the build tree.
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "__pycache__",
                                      ".pytest_cache", "*.egg-info", "*.pyc")


def _run(argv, **kwargs):
  result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
  assert result.returncode == 0, (argv, result.stdout[-3000:], result.stderr[-3000:])
  return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """The wheel pip builds from the checkout (a copy of it: the build writes build/ and
  *.egg-info next to pyproject.toml, and a stale build/ would leak old files into the wheel)."""
  tmp = tmp_path_factory.mktemp("wheel")
  tree = tmp / "tree"
  shutil.copytree(ROOT, tree, ignore=_NOT_SOURCES, symlinks=True)
  _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "-w", str(tmp / "dist"), str(tree)], cwd=tmp)
  (path,) = glob.glob(str(tmp / "dist" / "loopicl-*.whl"))
  return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
  """(python, run): a fresh venv with the wheel installed (not editable), and a function that
  runs code in it from a directory outside the checkout, with a fresh kernel cache."""
  tmp = tmp_path_factory.mktemp("venv")
  venv = tmp / "venv"
  _run([sys.executable, "-m", "venv", str(venv)])
  python = str(venv / "bin" / "python")
  _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel])
  work = tmp / "cwd"
  work.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
  env.update(PYTHONPATH=sysconfig.get_paths()["purelib"], JAX_PLATFORMS="cpu")

  def run(code: str, cache: str):
    return subprocess.run([python, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=work, env={**env, "LOOPICL_KERNEL_CACHE": str(tmp / cache)})

  return str(venv), run


def _kernel_files_the_build_needs() -> set[str]:
  """The checkout's kernel files the build reads (its sources, headers and what they include),
  and every C/C++ source or header there, as wheel entries (loopicl/kernels/<name>)."""
  needed = {os.path.relpath(path, ROOT) for path in kernels.build_inputs()}
  needed |= {os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(KERNELS, "*"))
             if path.endswith((".cc", ".cpp", ".h", ".hh", ".hpp", ".inc"))}
  return {path.replace(os.sep, "/") for path in needed}


def test_the_wheel_lists_simd_h_and_every_kernel_source(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  sources = glob.glob(os.path.join(KERNELS, "*.cc"))
  assert len(sources) >= 2
  expected = {"loopicl/kernels/simd.h", "loopicl/kernels/__init__.py"}
  expected |= {f"loopicl/kernels/{os.path.basename(path)}" for path in sources}
  expected |= _kernel_files_the_build_needs()
  assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"


def test_the_fused_kernel_builds_and_runs_from_the_installed_wheel(wheel, installed):
  venv, run = installed
  result = run("""
      import json, os
      import jax, jax.numpy as jnp, numpy as np
      import loopicl
      from loopicl import kernels
      from loopicl.linear import model
      d, n, m, d_out, loops, batch = 3, 6, 1, 1, 3, 5
      D = d + d_out
      k = jax.random.split(jax.random.key(0), 3)
      Z0 = jax.random.normal(k[0], (batch, D, n + m), jnp.float32)
      P, Q = (0.3 / np.sqrt(D) * jax.random.normal(key, (D, D), jnp.float32) for key in k[1:])
      out = {kernel: np.asarray(model.loop_readouts(P, Q, Z0, loops=loops, d_out=d_out,
                                                    n_queries=m, kernel=kernel))
             for kernel in ("cpu", "xla")}
      print(json.dumps({
          "file": loopicl.__file__, "inputs": kernels.build_inputs(), "lanes": kernels.lanes(),
          "auto": model.resolve_kernel("auto", dtype=jnp.float32),
          "shape": out["cpu"].shape, "finite": bool(np.isfinite(out["xla"]).all()),
          "close": bool(np.allclose(out["cpu"], out["xla"], rtol=1e-4, atol=1e-6)),
          "cache": os.listdir(os.environ["LOOPICL_KERNEL_CACHE"])}))
      """, cache="cache-built")
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  package = os.path.join(os.path.realpath(venv), "lib")
  assert os.path.realpath(out["file"]).startswith(package), out["file"]  # the wheel, not the checkout
  assert out["inputs"] and all(os.path.realpath(p).startswith(package) for p in out["inputs"])
  assert out["lanes"] in (4, 8, 16) and out["auto"] == "cpu"
  assert out["shape"] == [3, 5, 1, 1] and out["finite"] and out["close"]
  assert [name for name in out["cache"] if name.endswith(".so")], out["cache"]  # built here, now
  # The wheel ships every file that build read.
  names = set(zipfile.ZipFile(wheel).namelist())
  site = os.path.dirname(os.path.dirname(out["file"]))
  read = {os.path.relpath(p, site).replace(os.sep, "/") for p in out["inputs"]}
  assert read >= {"loopicl/kernels/simd.h", "loopicl/kernels/looped_attention.cc"} and read <= names
  assert _kernel_files_the_build_needs() <= names


def test_an_installation_without_simd_h_names_it_and_auto_warns_once(installed):
  """The issue's installation: simd.h absent.  "cpu" fails naming the file (not the cache);
  "auto" falls back to XLA with one warning naming the cause and the cost."""
  venv, run = installed
  result = run("""
      import os, shutil, tempfile
      from loopicl import kernels
      from loopicl.linear import model
      # This venv's installed copy of the kernel sources, without simd.h (the installation stays whole).
      copy = os.path.join(tempfile.mkdtemp(), "kernels")
      shutil.copytree(os.path.dirname(kernels.SOURCES[0]), copy,
                      ignore=shutil.ignore_patterns("simd.h", "__pycache__"))
      kernels.SOURCES = tuple(os.path.join(copy, os.path.basename(p)) for p in kernels.SOURCES)
      kernels.HEADERS = tuple(os.path.join(copy, os.path.basename(p)) for p in kernels.HEADERS)
      print(model.resolve_kernel("auto"), model.resolve_kernel("auto"))
      try:
        model.resolve_kernel("cpu")
      except kernels.KernelUnavailable as e:
        print("ERROR", e)
      """, cache="cache-missing")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert lines[0] == "xla xla"
  assert len(lines) == 2 and lines[1].startswith("ERROR model.kernel='cpu'")
  assert "loopicl/kernels/simd.h is missing" in lines[1] and "cache" not in lines[1].lower()
  warnings = [line for line in result.stderr.splitlines() if "falls back to 'xla'" in line]
  assert len(warnings) == 1, result.stderr[-3000:]
  assert "loopicl/kernels/simd.h is missing" in warnings[0] and "~7x slower on a CPU" in warnings[0]


def test_a_missing_source_is_named_before_anything_is_compiled_or_cached(tmp_path, monkeypatch):
  copy = tmp_path / "kernels"
  shutil.copytree(KERNELS, copy, ignore=shutil.ignore_patterns("simd.h", "__pycache__", "*.py"))
  monkeypatch.setattr(kernels, "SOURCES", tuple(str(copy / os.path.basename(p)) for p in kernels.SOURCES))
  monkeypatch.setattr(kernels, "HEADERS", tuple(str(copy / os.path.basename(p)) for p in kernels.HEADERS))
  monkeypatch.setenv("LOOPICL_KERNEL_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", "false")  # were it reached, this compiler would fail differently
  with pytest.raises(kernels.KernelUnavailable) as e:
    kernels.library_path()
  message = str(e.value)
  assert "\n" not in message and "loopicl/kernels/simd.h is missing" in message
  assert str(copy / "simd.h") in message and "model.kernel='xla'" in message
  assert "cache" not in message.lower() and not (tmp_path / "cache").exists()
  # A header the sources include but HEADERS does not list is found (and named) all the same.
  monkeypatch.setattr(kernels, "HEADERS", ())
  with pytest.raises(kernels.KernelUnavailable, match="loopicl/kernels/simd.h is missing"):
    kernels.library_path()
  # With every file present, the inputs are the sources and simd.h (JAX's ffi.h is not ours).
  shutil.copy(os.path.join(KERNELS, "simd.h"), copy / "simd.h")
  assert sorted(map(os.path.basename, kernels.build_inputs())) == [
      "candidates.cc", "looped_attention.cc", "simd.h"]


def test_no_compiler_is_named_as_such(tmp_path, monkeypatch):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
  monkeypatch.setenv("LOOPICL_KERNEL_CACHE", str(tmp_path / "cache"))
  with pytest.raises(kernels.KernelUnavailable, match=r"\$CXX=.*no-such-c\+\+.* was not found") as e:
    kernels.library_path()
  assert "cache" not in str(e.value).lower()
  monkeypatch.delenv("CXX")
  monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
  with pytest.raises(kernels.KernelUnavailable, match=r"no C\+\+ compiler found \(tried \$CXX, g\+\+, c\+\+, clang\+\+\)"):
    kernels.library_path()
  assert not (tmp_path / "cache").exists()
