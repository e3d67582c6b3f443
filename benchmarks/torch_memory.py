"""Measuring what a piece of torch code allocates (benchmarks and memory tests; not library code)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def tensor_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of live CPU tensor memory allocated inside `fn` (forward and backward), from torch's profiler.

    Why the profiler: tracemalloc cannot see torch's allocations and RSS is blurred by the
    allocator. The profiler attributes every allocation and free to the op it happens in
    (`self_cpu_memory_usage`); replaying them in order of the ops' end times gives the
    live-bytes curve at op granularity. (The legacy, non-kineto profiler: same numbers,
    without kineto's seconds of start-up.)
    """
    with torch.autograd.profiler.profile(profile_memory=True, use_kineto=False) as prof:
        fn()
    events = sorted((e for e in prof.function_events if e.self_cpu_memory_usage), key=lambda e: e.time_range.end)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak
