"""Concurrent programs in the Triton interpreter (TRITON_INTERPRET=1).

The interpreter runs a grid's programs one after another. The on-chip kernels' programs wait at a
barrier for the other programs of their channel group (bn_gpu.kernels.group_barrier): run one after
another, the first would wait for ever. `launch_concurrently` runs each program of such a grid in a
thread of its own, as a GPU runs them, with the interpreter's program index kept per thread; the
interpreter's atomics are atomic across threads. This uses the interpreter's own executor
(triton.runtime.interpreter.GridExecutor), so it follows the interpreter of the installed Triton.
"""
from __future__ import annotations

import inspect
import threading
import time

from triton.runtime import interpreter


# A grid's programs still running after this long wait at a barrier that will not open (a kernel's
# bug): the launch fails rather than hang. The tests' grids take seconds.
STUCK_SECONDS = 600


class _Aborted(Exception):
    """Raised in a program's thread once another program of the grid has failed (it would wait for ever)."""


class _Programs:
    """Stands in for the kernel's function in the interpreter's executor: each call (one per program,
    with the program index set) starts a thread; the call of the grid's last program waits for all."""

    def __init__(self, fn, grid_dims: tuple, index: threading.local, abort: threading.Event):
        self.fn = fn
        self.__signature__ = inspect.signature(fn)
        self.__globals__ = fn.__globals__
        self.__name__ = fn.__name__
        self.last = tuple(size - 1 for size in grid_dims)
        self.index = index
        self.abort = abort
        self.threads = []
        self.errors = []

    def _run(self, grid_idx, kwargs):
        self.index.grid_idx = grid_idx
        try:
            self.fn(**kwargs)
        except BaseException as error:  # noqa: B036 -- reported by the grid's call
            self.errors.append(error)
            self.abort.set()

    def __call__(self, **kwargs):
        grid_idx = interpreter.interpreter_builder.grid_idx
        thread = threading.Thread(target=self._run, args=(grid_idx, kwargs), daemon=True)
        thread.start()
        self.threads.append(thread)
        if grid_idx == self.last:
            deadline = time.monotonic() + STUCK_SECONDS
            for thread in self.threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            if any(thread.is_alive() for thread in self.threads):  # waiting at a barrier that never opens
                self.abort.set()
                raise RuntimeError(f"programs of {self.__name__} still running after {STUCK_SECONDS} s: "
                                   "waiting for programs that never arrive")
            if self.errors:  # the first failure, not the programs it stopped
                raise next((error for error in self.errors if not isinstance(error, _Aborted)), self.errors[0])


def launch_concurrently(kernel, grid: tuple, args: list, kwargs: dict) -> None:
    """kernel[grid](*args, **kwargs) in the interpreter, every program in a thread of its own."""
    builder = interpreter.interpreter_builder
    builder_type = type(builder)
    index = threading.local()
    abort = threading.Event()
    grid_dims = tuple(grid) + (1,) * (3 - len(grid))
    executor = interpreter.GridExecutor(kernel.rewrite(), kernel.arg_names, grid, kernel.pre_run_hooks)
    executor.fn = _Programs(executor.fn, grid_dims, index, abort)
    atomic_rmw = builder.create_atomic_rmw

    def checked_atomic_rmw(*a, **k):  # a program spinning at a barrier stops once another has failed
        if abort.is_set():
            raise _Aborted()
        return atomic_rmw(*a, **k)

    def get_index(_):
        return getattr(index, "grid_idx", None)

    def set_index(_, value):
        index.grid_idx = value

    builder_type.grid_idx = property(get_index, set_index)
    builder.create_atomic_rmw = checked_atomic_rmw
    try:
        executor(*args, **kwargs)
    finally:
        del builder_type.grid_idx
        del builder.create_atomic_rmw
