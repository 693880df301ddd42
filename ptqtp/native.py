"""The native CPU kernels (`ptqtp._C`): found where the install built them, else built once from the C++ sources
shipped inside the package and cached per user; `load_cpu()` is the one place that says whether the native
kernel is here, and if not, why.

Imports nothing from ptqtp, and only the standard library at module level: `setup.py` loads this file by path
to build the extension at install with the same sources and flags, and runs it as a script (`python native.py
build DIR`) for the build on first use, in a child process, so a compiler failure never takes the caller down.

Why on first use: `pip install .` builds in an isolated environment without torch, where the extension cannot
be compiled; a wheel therefore ships `ptqtp/csrc/cpu/*` and the first process that needs the kernel compiles
it (about a minute, one log line) into `$PTQTP_CACHE_DIR` (default `$XDG_CACHE_HOME/ptqtp` or `~/.cache/ptqtp`),
keyed by the sources, flags, torch, Python and machine, so a new torch or ptqtp version builds afresh. Where no
compiler exists, one log line says so and the torch reference path runs.

Portability by construction: no `-march` flag (the x86 kernels pick AVX2 / AVX-512 at run time through
target attributes; other CPUs build the generic kernel), and OpenMP only where the compiler takes `-fopenmp`
(Apple clang does not without libomp; MSVC gets `/openmp`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile

EXT = "ptqtp._C"
ENV_DISABLE = "PTQTP_NO_EXTENSIONS"  # "1": never load or build a native kernel
ENV_CACHE = "PTQTP_CACHE_DIR"
FLAGS_VERSION = 1  # bump when the build recipe changes: a new cache key, a fresh build
_HERE = pathlib.Path(__file__).resolve().parent
_log = logging.getLogger("ptqtp.native")


def cpu_source_dir() -> pathlib.Path | None:
    """The C++ sources: inside the installed package (`ptqtp/csrc/cpu`), or `csrc/cpu` of a source checkout."""
    for d in (_HERE / "csrc" / "cpu", _HERE.parent / "csrc" / "cpu"):
        if d.is_dir() and any(d.glob("*.cpp")):
            return d
    return None


def cpu_sources(root: pathlib.Path) -> list[str]:
    return [str(p) for p in sorted(root.glob("*.cpp"))]


def compiler() -> str:
    """The C++ compiler a torch extension build uses here (torch's BuildExtension takes $CXX, else `c++`)."""
    if sys.platform == "win32":
        return "cl"
    return os.environ.get("CXX") or "c++"


def accepts_openmp(cxx: str) -> bool:
    """Whether `cxx` compiles and links an OpenMP program with -fopenmp."""
    if shutil.which(cxx) is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = pathlib.Path(d) / "omp.cpp"
        src.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            res = subprocess.run([cxx, "-fopenmp", str(src), "-o", str(pathlib.Path(d) / "omp")],
                                 capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return res.returncode == 0


def compile_args(cxx: str | None = None) -> tuple[list[str], list[str]]:
    """(compile flags, link flags) of the CPU extension for this platform and compiler."""
    if sys.platform == "win32":
        return ["/O2", "/std:c++17", "/openmp"], []
    cxx = cxx or compiler()
    omp = accepts_openmp(cxx)
    return ["-O3", "-std=c++17", *(["-fopenmp"] if omp else [])], (["-fopenmp"] if omp else [])


def cache_root() -> pathlib.Path:
    if os.environ.get(ENV_CACHE):
        return pathlib.Path(os.environ[ENV_CACHE]).expanduser()
    if sys.platform == "win32":
        return pathlib.Path(os.environ.get("LOCALAPPDATA", pathlib.Path.home())) / "ptqtp" / "cache"
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "ptqtp"


def build_key(sources: list[str], cxx: str) -> str:
    """What a built extension depends on: sources and headers, recipe and compiler, torch, Python, machine."""
    import torch

    h = hashlib.sha256()
    headers = sorted({f for s in sources for f in pathlib.Path(s).parent.glob("*.h")})  # parallel.h and co.
    for s in [*sources, *headers]:
        h.update(pathlib.Path(s).name.encode() + b"\0" + pathlib.Path(s).read_bytes())
    for part in (FLAGS_VERSION, cxx, torch.__version__, sys.version, platform.machine(), sys.platform,
                 sysconfig.get_config_var("EXT_SUFFIX")):
        h.update(b"\0" + str(part).encode())
    return h.hexdigest()[:16]


def _built(folder: pathlib.Path) -> pathlib.Path | None:
    found = sorted(folder.glob("_C*.so")) + sorted(folder.glob("_C*.pyd"))
    return found[0] if found else None


def _import(path: pathlib.Path):
    import torch  # noqa: F401  (the extension links against the libraries torch loads)

    spec = importlib.util.spec_from_file_location(EXT, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[EXT] = module
    return module


def _no_kernel(reason: str):
    _log.warning("ptqtp: %s; CPU layers run the slower torch reference path (`ptqtp info` lists the backends).", reason)
    return None, reason


def build_cpu(cache: pathlib.Path | None = None, cxx: str | None = None):
    """(module, how) of the CPU extension built from the shipped sources into the cache (once), or
    (None, why not). Concurrent processes wait for one build (a file lock); a failed build is not retried until
    its folder is deleted, so every later run does not pay for it again."""
    src = cpu_source_dir()
    if src is None:
        return _no_kernel("the native CPU kernel is not built and this install has no C++ sources to build it "
                          "from; reinstall ptqtp")
    cxx = cxx or compiler()
    sources = cpu_sources(src)
    folder = (cache or cache_root()) / "ext" / f"cpu-{build_key(sources, cxx)}"
    so = _built(folder)
    if so is None:
        if shutil.which(cxx) is None:
            return _no_kernel(f"no C++ compiler ({cxx!r} not found) to build the native CPU kernel; install one "
                              "(g++ or clang; Xcode command line tools on macOS) or set CXX")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return _no_kernel(f"cannot create the kernel cache {folder} ({type(e).__name__}); set {ENV_CACHE} to a "
                              "writable folder")
        from filelock import FileLock  # a torch dependency

        with FileLock(str(folder / ".lock")):
            so = _built(folder)
            log = folder / "build.log"
            if so is None and (folder / "FAILED").exists():
                return _no_kernel(f"building the native CPU kernel failed before (see {log}); delete {folder} "
                                  "to try again")
            if so is None:
                _log.warning("ptqtp: building the native CPU kernel for this machine, once (about a minute); cached "
                             "in %s", folder)
                with open(log, "w") as out:
                    res = subprocess.run([sys.executable, __file__, "build", str(folder)], stdout=out, cwd=folder,
                                         stderr=subprocess.STDOUT, env={**os.environ, "CXX": cxx})
                so = _built(folder)
                if res.returncode != 0 or so is None:
                    (folder / "FAILED").write_text(f"exit status {res.returncode}\n")
                    return _no_kernel(f"building the native CPU kernel failed (see {log})")
    try:
        return _import(so), f"built on first use, cached in {folder}"
    except Exception as e:  # a corrupt or foreign file in the cache
        return _no_kernel(f"the cached native CPU kernel {so} does not load ({type(e).__name__}: {e}); delete "
                          f"{folder} to rebuild it")


@functools.lru_cache(maxsize=1)
def load_cpu():
    """(module, how it came) of `ptqtp._C`, or (None, why it is not available): the extension the install built,
    else the one built on first use (`build_cpu`)."""
    if os.environ.get(ENV_DISABLE) == "1":
        return None, f"native kernels disabled ({ENV_DISABLE}=1)"
    try:
        return importlib.import_module(EXT), "built at install"
    except ModuleNotFoundError:
        installed = None
    except Exception as e:  # e.g. an undefined symbol: built against another torch
        installed = f"the installed {EXT} does not load ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    ext, how = build_cpu()
    return ext, (how if installed is None or ext is not None else f"{installed}; {how}")


def _build_main(folder: str) -> None:
    """`python native.py build DIR`: compile the CPU extension into DIR with setuptools and torch's BuildExtension
    (no ninja needed)."""
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    src = cpu_source_dir()
    cflags, lflags = compile_args()
    print(f"sources: {src}\ncompile: {cflags}\nlink: {lflags}", flush=True)
    setup(name="ptqtp-native-cpu", ext_modules=[CppExtension("_C", cpu_sources(src), extra_compile_args=cflags,
                                                                 extra_link_args=lflags)],
          cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
          script_args=["build_ext", "--build-lib", folder, "--build-temp", str(pathlib.Path(folder) / "tmp")])


if __name__ == "__main__":
    if sys.path and pathlib.Path(sys.path[0] or ".").resolve() == _HERE:  # run as a script: ptqtp's modules
        del sys.path[0]  # (format.py, tasks.py, ...) must not shadow top-level ones
    if len(sys.argv) != 3 or sys.argv[1] != "build":
        sys.exit("usage: python native.py build DIR")
    _build_main(sys.argv[2])
