"""Install ptqtp; build the optional C++/CUDA kernels (`ptqtp._C`, `ptqtp._C_cuda`) where a toolchain exists.

Install torch first (your CUDA build, or `pip install torch==2.13.0` for the CPU wheel), then
`pip install --no-build-isolation .` so the extension builds against that torch. Without a compiler
(or with PTQTP_NO_EXTENSIONS=1) ptqtp installs pure-Python and falls back to Triton or the torch reference.
"""

import os
import re
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    with open(os.path.join(HERE, "ptqtp", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


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
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("ptqtp: no C++ compiler, skipping C++/CUDA kernels", file=sys.stderr)
        return [], {}
    exts = []
    cpu_sources = sorted(
        os.path.join("csrc", "cpu", f) for f in os.listdir(os.path.join(HERE, "csrc", "cpu")) if f.endswith(".cpp")
    ) if os.path.isdir(os.path.join(HERE, "csrc", "cpu")) else []
    if cpu_sources:
        exts.append(
            cpp_extension.CppExtension(
                "ptqtp._C",
                cpu_sources,
                extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
                extra_link_args=["-fopenmp"],
            )
        )
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
    version=_version(),
    description="Post-training ternary quantization (two trit-planes) for Hugging Face LLMs, with fast kernels",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["ptqtp", "ptqtp.*"]) + ["ptqtp.triton_kernels"],
    package_dir={"ptqtp.triton_kernels": "triton_kernels"},
    package_data={"ptqtp": ["data/*", "eval_tasks/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4,<3",
        "transformers>=5.0,<6",
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
    entry_points={"console_scripts": ["ptqtp=ptqtp.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
