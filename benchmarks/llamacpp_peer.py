"""Build the llama.cpp peer for this CPU once, outside the repo (see ../shared/MACHINE.md).

The build comes from PyPI's source distribution of llama-cpp-python: its vendored llama.cpp is
compiled with CMake for the flags /proc/cpuinfo shows (never -march=native: its AMX code crashes
on the Intel machines), and the Python binding is installed into this interpreter without a
second build, pointed at these libraries through LLAMA_CPP_LIB_PATH.

    python benchmarks/llamacpp_peer.py        # builds (≈10 min on 2 cores) and prints the lib dir

Benchmarks call `ensure_llamacpp()`; tests never need it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
CACHE = Path(os.environ.get("PAGEDLLM_PEER_CACHE", Path.home() / ".cache" / "pagedllm-peer"))

# CMake switch → the /proc/cpuinfo flag that allows it.
_ISA_FLAGS = {
    "GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c", "GGML_BMI2": "bmi2",
    "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
    "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16",
}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _build_dir() -> Path:
    flags = _cpu_flags()
    key = hashlib.sha1((cpu_model() + " ".join(sorted(flags))).encode()).hexdigest()[:10]
    return CACHE / f"llama.cpp-{VERSION}-{key}"


def _sdist() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"llama_cpp_python-{VERSION}.tar.gz"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(CACHE)], check=True)
    return path


def _build(out: Path) -> None:
    flags = _cpu_flags()
    src = out / "src"
    with tarfile.open(_sdist()) as tar:
        tar.extractall(src, filter="data")
    vendor = next(src.glob("llama_cpp_python-*/vendor/llama.cpp"))
    options = [f"-D{name}={'ON' if flag in flags else 'OFF'}" for name, flag in _ISA_FLAGS.items()]
    options += ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
                "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=ON"]
    build = out / "build"
    subprocess.run(["cmake", "-S", str(vendor), "-B", str(build), "-G", "Ninja", *options], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-bench", "llama-server", "-j", "2"], check=True)


def _install_binding(lib_dir: Path) -> None:
    try:
        import llama_cpp  # noqa: F401
        return
    except Exception:
        pass
    env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF", LLAMA_CPP_LIB_PATH=str(lib_dir))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", str(_sdist())], check=True, env=env)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "diskcache", "typing-extensions"], check=True)


def ensure_llamacpp() -> Path:
    """The folder holding this CPU's libllama.so and llama-bench (built on first use)."""
    out = _build_dir()
    lib_dir = out / "build" / "bin"
    if not (lib_dir / "llama-bench").exists():
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out):
            _build(out)
    _install_binding(lib_dir)
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    return lib_dir


if __name__ == "__main__":
    print(ensure_llamacpp())
