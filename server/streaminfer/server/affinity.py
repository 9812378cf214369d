"""CPU affinity: inference threads on CPUs of their own, every other thread on the rest.

On two cores, the event loop, the decode threads, gRPC's threads and the
inference thread all compete for both CPUs, so a forward pass runs slower in
the server than alone. Pinned to CPUs of their own, the inference threads keep
their CPU time and caches; the rest of the process shares the other CPUs.

Linux only: threads are pinned with ``os.sched_setaffinity``, which acts on one
thread when given its thread id.
"""

from __future__ import annotations

import os
import pathlib

from streaminfer.server.config import ConfigError


# Environment variables with which OpenMP places its threads on CPUs itself.
# With OMP_PROC_BIND=true, loading torch narrowed the main thread's CPUs to
# one, and OpenMP is expected to place the intra-op threads by its own rules
# rather than on the CPUs they inherit from a pinned inference thread.
OPENMP_BINDING_VARIABLES = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")


def split_cpus(inference_cpus: tuple[int, ...]) -> tuple[frozenset[int], frozenset[int]]:
    """Return (inference CPUs, CPUs for every other thread), checked against the CPUs this process may use."""
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError(
            f"server.inference_cpus = {format_cpus(inference_cpus)!r} needs Linux (thread CPU affinity); "
            "leave it empty on this system"
        )
    binding = [name for name in OPENMP_BINDING_VARIABLES if os.environ.get(name)]
    if binding:
        raise ConfigError(
            f"server.inference_cpus = {format_cpus(inference_cpus)!r} cannot work with {', '.join(binding)} set: "
            "OpenMP then places torch's threads on CPUs itself; unset it or leave inference_cpus empty"
        )
    allowed = frozenset(os.sched_getaffinity(0))
    inference = frozenset(inference_cpus)
    missing = inference - allowed
    if missing:
        raise ConfigError(
            f"server.inference_cpus = {format_cpus(inference_cpus)!r} names CPU(s) {format_cpus(missing)} that this "
            f"process may not use; it may use CPUs {format_cpus(allowed)}"
        )
    rest = allowed - inference
    if not rest:
        raise ConfigError(
            f"server.inference_cpus = {format_cpus(inference_cpus)!r} takes every CPU this process may use "
            f"({format_cpus(allowed)}); leave at least one CPU for the event loop, or leave inference_cpus empty"
        )
    return inference, rest


def pin_process(cpus: frozenset[int], passes: int = 3) -> int:
    """Pin every thread of this process to ``cpus``; return how many were pinned.

    Threads started later inherit the affinity of the thread that starts them.
    A thread that a thread not yet pinned starts during a pass is caught by
    the next pass. Passes repeat, up to ``passes``, until one finds no new thread.
    """
    pinned: set[int] = set()
    for _ in range(passes):
        found = {int(task.name) for task in pathlib.Path("/proc/self/task").iterdir()} - pinned
        if not found:
            break
        for thread_id in found:
            try:
                os.sched_setaffinity(thread_id, cpus)
            except ProcessLookupError:
                continue  # the thread ended meanwhile
            pinned.add(thread_id)
    return len(pinned)


def pin_current_thread(cpus: frozenset[int]) -> None:
    """Pin the calling thread, and the threads it starts from now on, to ``cpus``."""
    os.sched_setaffinity(0, cpus)


def format_cpus(cpus: tuple[int, ...] | frozenset[int]) -> str:
    """Write CPU numbers as a list with ranges, as taskset -c reads them: 0-2,5."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    index = 0
    while index < len(ordered):
        end = index
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        parts.append(str(ordered[index]) if end == index else f"{ordered[index]}-{ordered[end]}")
        index = end + 1
    return ",".join(parts)
