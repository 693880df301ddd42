"""Installed like a user installs it: a plain `pip install .` (isolated build, no torch there) gives the native
CPU kernel (built on first use, cached) and the offline eval tasks; the CLI starts without importing
transformers while `import ptqtp` still registers with it; an unsupported transformers is named; the build
flags fit compilers without OpenMP and CPUs without x86 intrinsics."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from ptqtp import native

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}


def _run(code: str, *, cwd, env=ENV, python=sys.executable, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_help_and_info_do_not_import_transformers(tmp_path):
    out = _run("""
        import sys
        import ptqtp.cli
        try:
            ptqtp.cli.main(["--help"])
        except SystemExit:
            pass
        assert ptqtp.cli.main(["info"]) == 0
        print("loaded:", "transformers" in sys.modules)
    """, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kernel backends on this machine" in out.stdout and out.stdout.strip().endswith("loaded: False")


def test_import_ptqtp_registers_once_transformers_is_imported(tiny_model_dir, tmp_path):
    """`import ptqtp` is cheap, and a plain AutoModelForCausalLM imported afterwards still loads trit-planes."""
    import ptqtp

    qdir = tmp_path / "q"
    ptqtp.quantize_checkpoint(str(tiny_model_dir("llama")), qdir, ptqtp.TritPlaneConfig(device="cpu", max_iters=2),
                              show_progress=False)
    out = _run(f"""
        import sys
        import ptqtp
        assert "transformers" not in sys.modules and "torch" not in sys.modules
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(qdir)!r})
        print(type(model.model.layers[0].mlp.up_proj).__name__)
    """, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "TritPlaneLinear", out.stderr[-2000:]


def test_an_unsupported_transformers_is_named(tmp_path):
    """transformers without the v5 quantizer API: one line at registration, and `from_pretrained` says which
    version is needed (instead of silence and a confusing load error)."""
    fake = tmp_path / "fake" / "transformers"
    (fake / "quantizers").mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "4.40.0"\n')
    (fake / "quantizers" / "__init__.py").write_text("")
    out = _run("""
        import ptqtp
        import transformers.quantizers  # what every from_pretrained imports first
        try:
            ptqtp.from_pretrained("nowhere")
        except ptqtp.PtqtpError as e:
            print("raised", type(e).__name__, e)
    """, cwd=tmp_path, env={**ENV, "PYTHONPATH": str(tmp_path / "fake")})
    assert out.returncode == 0, out.stderr[-2000:]
    warning = [line for line in out.stderr.splitlines() if line.startswith("ptqtp:")]
    assert len(warning) == 1 and "transformers 4.40.0" in warning[0] and "transformers>=5.0,<6" in warning[0]
    assert out.stdout.startswith("raised DependencyVersionError") and "pip install 'transformers>=5.0,<6'" in out.stdout


def test_no_compiler_is_one_line_and_the_reference_path_runs(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="ptqtp.native"):
        ext, why = native.build_cpu(tmp_path / "cache", cxx=str(tmp_path / "no-such-c++"))
    assert ext is None and why.startswith("no C++ compiler") and "\n" not in why
    assert [r.getMessage() for r in caplog.records] == [f"ptqtp: {why}; CPU layers run the slower torch reference "
                                                        "path (`ptqtp info` lists the backends)."]


def test_openmp_only_where_the_compiler_takes_it(tmp_path):
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler here")
    no_omp = tmp_path / "clang-without-libomp"  # like Apple clang: rejects -fopenmp
    no_omp.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec c++ "$@"\n')
    no_omp.chmod(0o755)
    cflags, lflags = native.compile_args(str(no_omp))
    assert "-fopenmp" not in cflags + lflags and "-O3" in cflags
    assert not any(f.startswith("-march") for f in cflags)  # the kernels pick their ISA at run time
    assert "-fopenmp" in native.compile_args("c++")[0]  # gcc here takes it


def _torch_free_sources() -> list[pathlib.Path]:
    return [p for p in sorted((ROOT / "csrc" / "cpu").glob("*.cpp")) if "torch/" not in p.read_text()]


def test_cpu_sources_build_without_openmp(tmp_path):
    """A compiler without OpenMP support still compiles every torch-free kernel source."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler here")
    for src in _torch_free_sources():
        res = subprocess.run(["c++", "-std=c++17", "-fsyntax-only", str(src)], capture_output=True, text=True)
        assert res.returncode == 0, f"{src.name} without -fopenmp:\n{res.stderr[-2000:]}"


def test_cpu_sources_build_on_a_cpu_without_x86_intrinsics(tmp_path):
    """Simulates aarch64 / Apple silicon on this x86 machine: system headers as the host builds them, then the
    x86 macros undefined and an <immintrin.h> that fails if included: the generic kernel must still compile."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler here")
    (tmp_path / "immintrin.h").write_text('#error "x86 intrinsics included on a CPU without them"\n')
    (tmp_path / "prelude.h").write_text("#include <cstdint>\n#include <cstring>\n#include <cmath>\n"
                                        "#include <algorithm>\n#include <vector>\n"
                                        "#undef __x86_64__\n#undef __i386__\n#undef __SSE__\n#undef __SSE2__\n")
    for src in _torch_free_sources():
        res = subprocess.run(["c++", "-std=c++17", "-fsyntax-only", "-include", str(tmp_path / "prelude.h"),
                              f"-I{tmp_path}", str(src)], capture_output=True, text=True)
        assert res.returncode == 0, f"{src.name} on a CPU without x86 intrinsics:\n{res.stderr[-2000:]}"


def _copy_source(dst: pathlib.Path) -> pathlib.Path:
    """The source tree as a clean clone has it: no build outputs, no in-place extensions."""
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.pyd",
                                  ".pytest_cache", ".hypothesis", "out", "demo-out", "runs")
    shutil.copytree(ROOT, dst, ignore=skip, symlinks=True)
    return dst


CHECK = """
    import pathlib, sys, torch
    import ptqtp
    from ptqtp import backends, native, ops, tasks
    from ptqtp.packing import PackedTritPlanes
    root = pathlib.Path(ptqtp.__file__).parent
    assert "site-packages" in root.parts, root  # the installed copy, not the source tree
    ext, how = native.load_cpu()
    assert ext is not None, how
    assert backends.select_backend(backends.KernelSpec("cpu", torch.float32, 1, 48, 160, 128)).name == "cpu"
    torch.manual_seed(0)
    p = PackedTritPlanes.from_trit_planes(ptqtp.decompose(torch.randn(48, 160), 128))
    x = torch.randn(3, 160)
    y = ops.trit_linear_eager(x, p.packed, p.scales, None, 128, 160)
    torch.testing.assert_close(y, ops.trit_linear_reference(x, p.packed, p.scales, None, 128, 160))
    specs, _ = tasks.prepare_tasks(["boolq"], None)
    cfg, source = specs["boolq"]
    assert source == "offline" and root in pathlib.Path(cfg["dataset_kwargs"]["data_files"]["test"]).parents
    print("HOW", how)
"""


@pytest.mark.slow
def test_pip_install_gives_the_native_cpu_kernel_and_the_offline_tasks(tmp_path):
    """`pip install .` with default build isolation (torch absent from the build) into a fresh venv; torch and the
    other dependencies come from this environment (layered, as the project's venvs are). The first process builds
    the CPU kernel into the cache, the next one just loads it."""
    import torch
    import transformers
    import yaml

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    src = _copy_source(tmp_path / "src")
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(src)],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    site = pathlib.Path(_run("import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path,
                             python=py).stdout.strip())
    assert not list((site / "ptqtp").glob("_C*")), "the isolated build saw torch: this test would prove nothing"
    deps = {str(pathlib.Path(m.__file__).resolve().parents[1]) for m in (torch, transformers, yaml)}
    (site / "zz_deps.pth").write_text("\n".join(sorted(deps)) + "\n")  # after the venv's own site-packages

    env = {**ENV, native.ENV_CACHE: str(tmp_path / "cache")}
    first = _run(CHECK, cwd=tmp_path, python=py, env=env, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "HOW built on first use" in first.stdout and "building the native CPU kernel" in first.stderr
    second = _run(CHECK, cwd=tmp_path, python=py, env=env)
    assert second.returncode == 0 and "HOW built on first use" in second.stdout, second.stderr[-3000:]
    assert "building" not in second.stderr  # cached
    info = subprocess.run([str(venv / "bin" / "ptqtp"), "info"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert info.returncode == 0 and any(line.split()[:2] == ["cpu", "yes"] for line in info.stdout.splitlines()), \
        info.stdout + info.stderr[-2000:]


def test_the_source_tree_task_folder_is_the_packaged_one():
    """One copy: eval/tasks (for `lm_eval --include_path eval/tasks` from the repository root) is the package's
    task folder, and every task's data file exists where its YAML says, relative to the repository root."""
    import yaml

    from ptqtp import tasks

    assert (ROOT / "eval" / "tasks").resolve() == tasks.TASKS_DIR.resolve()
    assert set(tasks.offline_tasks()) == {"arc_easy", "piqa", "boolq", "lambada_openai", "gsm8k"}
    for path in tasks.offline_tasks().values():
        files = yaml.safe_load(path.read_text())["dataset_kwargs"]["data_files"]
        assert all((ROOT / rel).is_file() and (ROOT / rel).parent == tasks.DATA_DIR for rel in files.values()), files
