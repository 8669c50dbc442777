"""Peak memory of a piece of work on the CPU, for tests and benchmarks.

``torch.cuda.max_memory_allocated`` has no CPU counterpart, so :func:`peak_tensor_bytes`
reads it from the profiler: every allocation event carries the allocator's running
total of live tensor bytes. The event tree is an experimental torch API; the function
returns None where it is missing. The resident-set helpers measure what the process
holds, allocator caches included (an upper bound).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterator

import torch


def peak_tensor_bytes(step: Callable[[], object], *, within: str | None = None) -> int | None:
    """Peak of live CPU tensor bytes during ``step()``, above those live before it.

    With ``within``, only the profiler ranges of that name count (e.g. the ranges
    ``betakd.chunked`` records around its forward and backward passes): the largest
    rise of the running total inside any one of them above its value at the range's
    start.
    """
    try:
        from torch._C._profiler import _EventType
    except ImportError:
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        step()
    try:
        nodes = list(_walk(prof.profiler.kineto_results.experimental_event_tree()))
        events = sorted(
            (n for n in nodes if n.typed[0] == _EventType.Allocation),
            key=lambda n: n.start_time_ns,
        )
        # (time, running total after the event, the total before it)
        timeline = [
            (
                e.start_time_ns,
                e.typed[1].total_allocated,
                e.typed[1].total_allocated - e.typed[1].alloc_size,
            )
            for e in events
        ]
    except AttributeError:
        return None
    if not timeline:
        return 0
    if within is None:
        return max(total for _, total, _ in timeline) - timeline[0][2]
    ranges = [(n.start_time_ns, n.end_time_ns) for n in nodes if n.name == within]
    peak = 0
    for start, end in ranges:
        inside = [(total, before) for time, total, before in timeline if start <= time <= end]
        if inside:
            peak = max(peak, max(total for total, _ in inside) - inside[0][1])
    return peak


def _walk(nodes) -> Iterator:
    for node in nodes:
        yield node
        yield from _walk(node.children)


def current_rss_bytes() -> int:
    """The process's resident set now (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The process's highest resident set so far (Linux).

    Read from ``VmHWM``, which starts afresh in a new program; ``ru_maxrss`` is carried
    over from the parent process across ``exec``, so a subprocess started by a large
    parent would report the parent's peak.
    """
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
