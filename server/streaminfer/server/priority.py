"""Thread priority: gRPC's I/O threads give way to the event loop.

Every message of every stream passes through the event loop thread, which
reads it, routes it and writes the response. gRPC's own threads (its event
engine's pool, timer and lifeguard, and the completion-queue poller that
grpc.aio starts) wake for each read and write. On a machine with few cores the
kernel shares the CPUs evenly between all runnable threads, so each wake-up
can push the event loop off its CPU while work for hundreds of streams
waits on it. Run at a lower priority (a higher nice value), those threads still
get every CPU cycle the loop leaves, but no longer take the loop's.

Measured on 2 cores with the load generator on the same machine, 64 streams
of 1,024-byte chunks through the no-op model: 12,300 to 14,000 messages/s
with gRPC's threads at the loop's priority, 16,100 to 16,800 with them 10
nice levels lower (the event loop had waited for a CPU 28 % of the time).

Linux only: a thread's nice value is set with ``setpriority`` on its thread id.
Raising a nice value needs no privilege. Inference threads keep the loop's
priority: they are the other stage every chunk needs, and at a lower priority
Silero VAD's served throughput fell by about a tenth, its thread losing CPU
time to the load generator.
"""

from __future__ import annotations

import logging
import os
import pathlib
import threading

logger = logging.getLogger(__name__)

# The names grpcio 1.85 gives its threads (Linux truncates them to 15 bytes),
# and the end of the poller thread's Python name.
GRPC_THREAD_NAMES = frozenset({"event_engine", "grpc_global_tim", "lifeguard"})
GRPC_POLLER_SUFFIX = "(_poll_wrapper)"
TASKS = pathlib.Path("/proc/self/task")


def python_threads() -> list[threading.Thread]:
    """Return the Python threads of this process that are running."""
    return threading.enumerate()


def grpc_thread_ids(tasks: pathlib.Path = TASKS) -> set[int]:
    """Return the thread ids of gRPC's threads in this process."""
    found = {thread.native_id for thread in python_threads() if thread.name.endswith(GRPC_POLLER_SUFFIX)}
    for task in tasks.iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended meanwhile
        if name in GRPC_THREAD_NAMES:
            found.add(int(task.name))
    return found


def thread_nice(thread_id: int) -> int:
    """Return the nice value of one thread of this process."""
    return os.getpriority(os.PRIO_PROCESS, thread_id)


class GrpcThreadPriority:
    """The lowering of gRPC's threads to ``offset`` nice levels below the event loop's.

    Call ``lower`` on the event loop thread: the first call reads that
    thread's nice value. Threads that gRPC starts later inherit the nice value of
    the thread that starts them, usually one already lowered; ``lower`` called
    again catches the others.
    """

    def __init__(self, offset: int, tasks: pathlib.Path = TASKS) -> None:
        self.offset = offset
        # The event loop's nice value, and the one gRPC's threads get: offset above it, at most 19.
        self.loop_nice: int | None = None
        self.target: int | None = None
        self.lowered: set[int] = set()
        self.failed = False
        self._tasks = tasks

    @property
    def active(self) -> bool:
        """Return True while lowering is requested and has not failed."""
        return self.offset > 0 and not self.failed

    def lower(self) -> int:
        """Lower the threads not lowered yet, and return how many were lowered this time."""
        if not self.active:
            return 0
        if self.target is None:
            self.loop_nice = os.getpriority(os.PRIO_PROCESS, 0)
            self.target = min(19, self.loop_nice + self.offset)
            if self.target <= self.loop_nice:
                self._fail(f"the event loop already runs at nice {self.loop_nice}, the lowest priority")
                return 0
        try:
            current = grpc_thread_ids(self._tasks)
        except OSError as error:
            self._fail(f"listing this process's threads failed ({error})")
            return 0
        # Forget threads that ended, so that a new thread given a reused id is lowered too.
        self.lowered &= current
        found = current - self.lowered
        count = 0
        for thread_id in found:
            try:
                if thread_nice(thread_id) < self.target:
                    os.setpriority(os.PRIO_PROCESS, thread_id, self.target)
            except ProcessLookupError:
                continue  # the thread ended meanwhile
            except OSError as error:
                self._fail(f"setpriority on thread {thread_id} failed ({error})")
                return count
            self.lowered.add(thread_id)
            count += 1
        return count

    def _fail(self, reason: str) -> None:
        self.failed = True
        logger.warning(
            "gRPC's threads keep the event loop's priority: %s. Set server.grpc_thread_nice = 0 to skip this step",
            reason,
        )


def supported() -> bool:
    """Return True where thread nice values can be set: Linux, with /proc."""
    return hasattr(os, "setpriority") and TASKS.is_dir()
