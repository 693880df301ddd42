"""Install ptqtp; build the optional C++/CUDA kernels (`ptqtp._C`, `ptqtp._C_cuda`) where torch and a toolchain
exist at build time.

A plain `pip install .` builds in an isolated environment without torch: the CPU kernel's sources then ship
inside the package (`ptqtp/csrc/cpu`) and `ptqtp.native` compiles them on first use, once, into a user cache.
`pip install --no-build-isolation .` (torch installed first) builds `ptqtp._C` at install instead, with the same
sources and flags (`ptqtp/native.py`), and the CUDA kernels where nvcc and a CUDA torch exist. Without a
compiler (or with PTQTP_NO_EXTENSIONS=1) ptqtp runs on Triton or the torch reference path.
"""

import os
import re
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _declared(name: str) -> str:
    """A string constant of ptqtp/_version.py (the version, the supported transformers)."""
    with open(os.path.join(HERE, "ptqtp", "_version.py")) as f:
        return re.search(name + r' = "([^"]+)"', f.read()).group(1)


def _native():
    """ptqtp/native.py loaded by path (it imports only the standard library): the CPU kernel's sources and flags."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_ptqtp_native", os.path.join(HERE, "ptqtp", "native.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    """C++ CPU kernels always (when torch and a compiler exist); CUDA kernels when nvcc and CUDA torch exist."""
    if os.environ.get("PTQTP_NO_EXTENSIONS") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except Exception:
        print("ptqtp: torch not importable at build time, skipping C++/CUDA kernels", file=sys.stderr)
        return [], {}
    native = _native()
    if shutil.which(native.compiler()) is None:
        print("ptqtp: no C++ compiler, skipping C++/CUDA kernels", file=sys.stderr)
        return [], {}
    exts = []
    src = native.cpu_source_dir()
    cpu_sources = [os.path.relpath(p, HERE) for p in native.cpu_sources(src)] if src else []
    if cpu_sources:
        cflags, lflags = native.compile_args()
        exts.append(cpp_extension.CppExtension("ptqtp._C", cpu_sources, extra_compile_args=cflags,
                                               extra_link_args=lflags))
    cuda_dir = os.path.join(HERE, "csrc", "cuda")
    cuda_ok = cpp_extension.CUDA_HOME is not None and getattr(__import__("torch").version, "cuda", None)
    if cuda_ok and os.path.isdir(cuda_dir) and os.environ.get("PTQTP_NO_CUDA") != "1":
        cuda_sources = sorted(
            os.path.join("csrc", "cuda", f) for f in os.listdir(cuda_dir) if f.endswith((".cu", ".cpp"))
        )
        if cuda_sources:
            exts.append(
                cpp_extension.CUDAExtension(
                    "ptqtp._C_cuda",
                    cuda_sources,
                    extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "--use_fast_math"]},
                )
            )
    if not exts:
        return [], {}
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    name="ptqtp",
    version=_declared("__version__"),
    description="Post-training ternary quantization (two trit-planes) for Hugging Face LLMs, with fast kernels",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # csrc/ installs as ptqtp/csrc (the CPU kernel's C++ sources, built on first use: see ptqtp/native.py)
    packages=find_packages(include=["ptqtp", "ptqtp.*"]) + ["ptqtp.triton_kernels", "ptqtp.csrc"],
    package_dir={"ptqtp.triton_kernels": "triton_kernels", "ptqtp.csrc": "csrc"},
    package_data={"ptqtp": ["data/*", "eval_tasks/*.yaml", "eval_tasks/data/*"],
                  "ptqtp.csrc": ["cpu/*.cpp", "cpu/*.h"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4,<3",
        _declared("TRANSFORMERS_PIN"),
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface_hub>=0.30",
        "numpy>=1.24",
        "tqdm>=4.60",
        "psutil>=5.9",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "eval": ["lm-eval>=0.4.5", "matplotlib>=3.7"],
        # peer quantizers for `ptqtp eval --peer` and the results table; never needed by ptqtp itself.
        # gptqmodel 7.7.0 requires torch>=2.14.1: install it in its own environment.
        "peers": ["hqq==0.2.8.post1"],
        "peers-gptq": ["gptqmodel==7.7.0"],
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "triton>=3.0", "lm-eval>=0.4.5", "gguf>=0.10"],
        "dev": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "triton>=3.0", "lm-eval>=0.4.5", "gguf>=0.10",
                "matplotlib>=3.7"],
    },
    entry_points={
        "console_scripts": ["ptqtp=ptqtp.cli:main"],
        # vLLM loads this in every process (front end, engine core, workers): serves quant_method "ptqtp"
        "vllm.general_plugins": ["ptqtp = ptqtp.integrations.vllm:register"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
