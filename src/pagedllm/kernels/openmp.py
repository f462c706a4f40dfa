"""OpenMP worker pools belong to the thread that started them: hand them back when a thread is done.

Why kernels driven from a second thread ran at less than half speed (issue 33). torch's CPU build
runs `at::parallel_for` (our kernels, its own ops) on GNU OpenMP. libgomp gives every OS thread that
starts a parallel region a pool of its own workers and keeps it alive after the region. When the
workers of all pools outnumber the CPUs, libgomp stops spinning between regions: it waits ~100 spins
(instead of ~300,000, a few ms) and then sleeps on a futex (`gomp_throttled_spin_count_var`). A decode
step is hundreds of small parallel regions, each of which then pays a wake-up: on 2 cores, a model
loaded (or run) in the main thread and stepped from another thread made 75-85 tok/s against 190, its
threads idle ~45% of the time (measured per task in /proc).

The answer: a thread that has finished a stretch of kernel work releases its pool
(`omp_pause_resource_all`, OpenMP 5.0), so that only the thread running kernels now owns workers.
The engine core runs in the main thread of a process of its own; the front ends that may run kernels
in some thread (`LLM`, engine construction, adapter loading) release their pools when they return.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

OMP_PAUSE_SOFT = 1  # omp_pause_soft: the workers exit; a later parallel region starts new ones


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch has loaded (dlopen by soname finds the loaded copy), if it has the call."""
    import torch  # noqa: F401  (loads the runtime this must find)

    for name in ("libgomp.so.1", "libiomp5.so", "libomp.so"):
        try:
            runtime = ctypes.CDLL(name)
        except OSError:
            continue
        if hasattr(runtime, "omp_pause_resource_all"):
            return runtime
    return None


def release_thread_pool() -> bool:
    """Let the calling thread's OpenMP workers go (the next parallel region it starts makes new ones);
    False where the runtime cannot (no OpenMP, or inside a parallel region)."""
    runtime = _openmp()
    return runtime is not None and runtime.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0


@contextlib.contextmanager
def kernels_in_this_thread() -> Iterator[None]:
    """Run kernels in the block, then hand the thread's workers back (so a thread that runs kernels
    later, this one or another, is the only one holding a pool)."""
    try:
        yield
    finally:
        release_thread_pool()
