"""Memory probes, one of each: this process's resident memory (Linux /proc; elsewhere what getrusage
knows), its peak on CPU or GPU, and a GPU's size. For records, checks and benchmarks."""

from __future__ import annotations

import os
import sys


def rss_bytes() -> int:
    """Resident memory now (0 where /proc is missing, e.g. macOS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """This process image's peak resident set size: VmHWM on Linux. Not getrusage's ru_maxrss,
    which Linux carries over from the parent across fork and exec (a worker forked from a large
    process would start at that process's size)."""
    peak = _status_kib("VmHWM")
    if peak is not None:
        return peak * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1024 if sys.platform != "darwin" else 1)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_private_rss_bytes() -> int:
    """peak_rss_bytes less the shared memory this process maps now (RssShmem): in a Ray worker, the
    pages of Ray's object store that it wrote or read, which stay mapped after the objects are gone
    and belong to the object store's budget, not to the task."""
    return max(0, peak_rss_bytes() - (_status_kib("RssShmem") or 0) * 1024)


def private_rss_bytes() -> int:
    """Resident memory now, less shared memory (see peak_private_rss_bytes)."""
    return max(0, rss_bytes() - (_status_kib("RssShmem") or 0) * 1024)


def release_freed() -> None:
    """Return memory that was freed but kept by the allocators (glibc's malloc_trim, pyarrow's pool) to
    the OS: a long-lived Ray worker that ran many tasks otherwise keeps the high-water mark of all of them."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    if "pyarrow" in sys.modules:  # pyarrow's own allocator (jemalloc or mimalloc) keeps freed pages too
        sys.modules["pyarrow"].default_memory_pool().release_unused()


def reset_peak_rss() -> None:
    """Start peak_rss_bytes afresh from the memory held now (Linux: clear_refs 5), so that a Ray task
    measures its own peak rather than that of whatever its worker process ran before. Memory that
    earlier tasks freed but the allocators kept (glibc's, pyarrow's) is returned to the OS first, so
    that it is not counted either."""
    release_freed()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_bytes(device) -> int:
    """Peak memory of this process on device: allocated device memory on GPU, resident set size on CPU."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch  # only where a GPU is used

        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def gpu_total_bytes() -> int | None:
    """The memory of this process's (first visible) GPU, or None without one."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None
