"""glibc malloc thresholds pinned (``--malloc steady``); imports nothing, so stock workers may use it."""

from __future__ import annotations


def steady_malloc() -> bool:
    """Pin glibc malloc's thresholds so that big blocks are reused instead of re-faulted (``--malloc steady``).

    Beam search reorders (``index_select``) the whole cross-attention cache on
    every step: at bart-base dims, batch 4 x 4 beams and 512 source tokens that
    is 12 fresh 25 MB tensors per step. glibc adjusts its mmap threshold
    dynamically and trims the heap when the top of it is free, so whether those
    blocks come back from the heap or as new, zero-filled pages (page faults)
    depends on the process's allocation history: stock beam 4 took 11.8-12.0 s
    (medians of two runs) with the default and 10.8 s with the pinned thresholds
    (docs/benchmarks.md), and a 1-3% difference between rows drowns in that. A
    fixed 32 MiB mmap threshold (glibc's maximum) and a 1 GiB trim threshold
    make every row reuse freed blocks, like PyTorch's caching allocator does on
    GPUs. Returns whether both settings took (glibc only).
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
