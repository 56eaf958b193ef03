"""Replayed calls: the host path of an op call whose signature was seen before.

A training or eval forward (or a backward) on a backend that registers a launcher here (Triton,
CuPy) spends its host time validating,
looking up the geometry, choosing the path and building each launch's specialization key -- all
decided by the call's signature: every tensor argument's shape, strides, dtype, device and 16-byte
alignment, momentum and eps, relu and the backward's flags. The first calls of a signature run that host
path (bn_gpu.backends.orchestration, unchanged) and record what it did: the buffers it allocated (through
orchestration.empty) or took (orchestration.workspace), the copies it made into them (through
orchestration.copy_into: an input or dy in a layout the kernels do not read, expanded dy included), the
finalize counters it took, and each
launch's compiled kernel with its arguments, every tensor argument traced back to a call argument, a
buffer or one row of a buffer (a launch given integer addresses, as CuPy's are, by the address:
the argument or buffer it points into, and where). Later calls with the same signature allocate the same buffers, make
the same copies and call the same compiled kernels with the same arguments, skipping everything else.

A signature is recorded only when its host path is nothing but those steps: all its launches went
through the compiled launchers (not the JIT: a first launch is never recorded, the next call is),
every tensor a launch got is accounted for (a copy made outside orchestration.copy_into -- of a
strided weight or running statistic -- is not, and refuses the recording), every copy came before
the first launch, and no argument is passed twice. Forward calls with a residual are not replayed (its relayout copy would go unseen),
nor backward calls that leave a gradient out (their empty results are made outside the buffers).
Replays apply only where the backend's launcher says they do (Triton: it calls compiled kernels
directly and no launch hook is registered); otherwise every call takes the full path. Each launcher
keeps its own replays, so a new launcher starts afresh.
"""
from __future__ import annotations

import functools
import operator
import threading
from dataclasses import dataclass

import torch

from . import orchestration

MAX_SIGNATURES = 1024   # replays kept per launcher; a new signature past that starts again
_ATTEMPTS = 3           # recordings tried per signature before it is left to the full path
_REFUSED = "refused"    # a signature that is never replayed

_recording_lock = threading.Lock()
_HOMES: dict = {}  # backend name -> the module of its launcher (see register)


def register(backend: str, home) -> None:
    """A backend whose launcher keeps replays offers it here when it is imported. `home` is the
    module its kernel table launches through:
        home.launch                      the launcher (its `replays` dict), replaced while a call is recorded
        home.replay_launcher()           that launcher when replays apply now, else None
        home.recording_launch(launch, seen)   a stand-in for `launch` that launches and then calls
                                         seen(entry, operands, scalars): what a replay needs to launch
                                         again (None: not replayable), the launch's tensors (or
                                         Address for an integer pointer), its other arguments
        home.replay_step(entry, operands, scalars)   one step of a Replay; operands as (pool index, byte offset)
        home.run_steps(steps, pool)      the steps launched on the current stream"""
    _HOMES[backend] = home


@dataclass(frozen=True)
class Address:
    """A pointer a launch got as an integer (CuPy's arguments): traced back by its value."""
    value: int


def launcher(backend: str):
    """The launcher of `backend` when its calls may be replayed now, else None (a backend without
    replays, or one not imported yet: its first call takes the full path)."""
    home = _HOMES.get(backend)
    return None if home is None else home.replay_launcher()


def _home_of(launch):
    for home in _HOMES.values():
        if home.launch is launch:
            return home
    raise LookupError("a launcher no backend registered")


# The keys are spelled out tensor by tensor: a comprehension over the per-channel tensors costs a
# frame more a call. A tensor stands for its shape, strides, dtype, device and the
# address's remainder mod 16 (the JIT specializes on 16-byte alignment); None for none.

def train_key(x, weight, bias, running_mean, running_var, counter, momentum, eps, relu) -> tuple:
    """Everything a training forward's host path decides from (the validation included)."""
    w, b, m, v, c = weight, bias, running_mean, running_var, counter
    return ("train", relu, momentum, eps, x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15,
            None if w is None else (w.shape, w.stride(), w.dtype, w.device, w.data_ptr() & 15),
            None if b is None else (b.shape, b.stride(), b.dtype, b.device, b.data_ptr() & 15),
            None if m is None else (m.shape, m.stride(), m.dtype, m.device, m.data_ptr() & 15),
            None if v is None else (v.shape, v.stride(), v.dtype, v.device, v.data_ptr() & 15),
            None if c is None else (c.shape, c.stride(), c.dtype, c.device, c.data_ptr() & 15))


def eval_key(x, weight, bias, running_mean, running_var, eps, relu) -> tuple:
    """Everything an eval forward's host path decides from (the validation included)."""
    w, b, m, v = weight, bias, running_mean, running_var
    return ("eval", relu, eps, x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15,
            None if w is None else (w.shape, w.stride(), w.dtype, w.device, w.data_ptr() & 15),
            None if b is None else (b.shape, b.stride(), b.dtype, b.device, b.data_ptr() & 15),
            None if m is None else (m.shape, m.stride(), m.dtype, m.device, m.data_ptr() & 15),
            None if v is None else (v.shape, v.stride(), v.dtype, v.device, v.data_ptr() & 15))


def backward_key(grad_y, x, weight, mean, invstd, bias, training, need_input_grad, need_weight_grad, relu) -> tuple:
    """Everything a backward's host path decides from."""
    w, m, i, b = weight, mean, invstd, bias
    return ("backward", training, need_input_grad, need_weight_grad, relu, grad_y.shape, grad_y.stride(), grad_y.dtype,
            grad_y.device, grad_y.data_ptr() & 15, x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15,
            None if w is None else (w.shape, w.stride(), w.dtype, w.device, w.data_ptr() & 15),
            (m.shape, m.stride(), m.dtype, m.device, m.data_ptr() & 15),
            (i.shape, i.stride(), i.dtype, i.device, i.data_ptr() & 15),
            None if b is None else (b.shape, b.stride(), b.dtype, b.device, b.data_ptr() & 15))


@dataclass(frozen=True, eq=False)
class Replay:
    """One signature's host path as recorded. Its pool of tensors, in order: the call's tensor
    arguments, the buffers, rows of buffers, the finalize counters (or None), None."""
    buffers: tuple   # ("empty", shape, dtype, strides or None) of each orchestration.empty,
                     # ("workspace", shape, dtype, slot) of each orchestration.workspace
    allocations: tuple  # the same buffers as calls bound to their arguments (device included)
    rows: tuple      # (buffer, row): buffers[buffer][row], a view a launch took
    copies: tuple    # (destination, source) pool indices: pool[destination].copy_(pool[source]), before the launches
    counter_groups: int  # finalize_counters' groups, 0 when none were taken
    steps: tuple     # the launches, as the backend's launcher module made them (register: replay_step)
    outputs: operator.itemgetter  # the returned tensors from the pool
    home: object     # the module of the launcher (register): its run_steps

    def run(self, inputs: tuple, guarded: bool = False) -> tuple:
        """The recorded host path on these arguments (in the op's order), on their device."""
        if not guarded and inputs[0].is_cuda and inputs[0].get_device() != torch.cuda.current_device():
            with torch.cuda.device(inputs[0].device):
                return self.run(inputs, guarded=True)
        if orchestration.empty is _ORCHESTRATION_EMPTY and orchestration.workspace is _ORCHESTRATION_WORKSPACE:
            buffers = [allocate() for allocate in self.allocations]
        else:  # (tests replace them to poison the buffers)
            device = inputs[0].device
            buffers = [getattr(orchestration, kind)(shape, dtype, device, last)
                       for kind, shape, dtype, last in self.buffers]
        pool = [*inputs, *buffers]
        if self.rows:
            pool += [buffers[b][r] for b, r in self.rows]
        counters = orchestration.finalize_counters(inputs[0].device, self.counter_groups) if self.counter_groups \
            else None
        pool += (counters, None)
        for destination, source in self.copies:
            pool[destination].copy_(pool[source])
        self.home.run_steps(self.steps, pool)
        return self.outputs(pool)


def picker(indices: list):
    """A function of the pool giving the tuple of its items at `indices` (operator.itemgetter,
    which gives the item itself for one index)."""
    pick = operator.itemgetter(*indices)
    return pick if len(indices) > 1 else lambda pool: (pick(pool),)


_ORCHESTRATION_EMPTY = orchestration.empty
_ORCHESTRATION_WORKSPACE = orchestration.workspace


def _allocation(kind, shape, dtype, last, device):
    """A buffer's orchestration call as a call bound to its arguments: a replay allocates it without
    a Python frame of its own (`last`: the strides of an `empty`, the slot of a `workspace`)."""
    if kind == "workspace":
        return functools.partial(_ORCHESTRATION_WORKSPACE, shape, dtype, device, last)
    if last is None:
        return functools.partial(torch.empty, shape, dtype=dtype, device=device)
    return functools.partial(torch.empty_strided, shape, last, dtype=dtype, device=device)


class _Refused(Exception):
    """The recorded host path did something a replay would not repeat."""


class _Recording:
    """Watches one call's host path: orchestration.empty, .workspace, .finalize_counters, .copy_into
    and the backend's launches, on the recording thread only (other threads pass through)."""

    def __init__(self, launch, inputs: tuple):
        self.launch, self.inputs = launch, inputs
        self.home = _home_of(launch)
        self.thread = threading.get_ident()
        self.buffers, self.launches, self.copies = [], [], []
        self.counters = None      # (tensor, groups)
        self.complete = True      # every launch found its compiled kernel before it ran

    def __enter__(self):
        self.saved = (orchestration.empty, orchestration.workspace, orchestration.finalize_counters, self.home.launch,
                      orchestration.copy_into)
        empty, workspace, finalize_counters, launch, copy_into = self.saved

        def recorded_empty(shape, dtype, device, strides=None):
            t = empty(shape, dtype, device, strides)
            if threading.get_ident() == self.thread:
                self.buffers.append((t, ("empty", shape, dtype, strides)))
            return t

        def recorded_workspace(shape, dtype, device, slot=0):
            t = workspace(shape, dtype, device, slot)
            if threading.get_ident() == self.thread:
                self.buffers.append((t, ("workspace", shape, dtype, slot)))
            return t

        def recorded_counters(device, groups):
            t = finalize_counters(device, groups)
            if threading.get_ident() == self.thread:
                self.counters = (t, groups)
            return t

        def recorded_copy(buffer, t):
            if threading.get_ident() == self.thread:
                self.copies.append((buffer, t, len(self.launches)))
            return copy_into(buffer, t)

        def seen(entry, operands, scalars):
            if threading.get_ident() == self.thread:
                self.complete = self.complete and entry is not None
                self.launches.append((entry, tuple(operands), tuple(scalars)))

        orchestration.empty, orchestration.workspace = recorded_empty, recorded_workspace
        orchestration.finalize_counters, orchestration.copy_into = recorded_counters, recorded_copy
        self.home.launch = self.home.recording_launch(launch, seen)
        return self

    def __exit__(self, *exc):
        (orchestration.empty, orchestration.workspace, orchestration.finalize_counters, self.home.launch,
         orchestration.copy_into) = self.saved

    def _address_source(self, value: int, buffers: list, counters) -> tuple:
        """Where an integer pointer points: ("input", i, 0), ("buffer", i, byte offset),
        ("counters", None, byte offset) or ("none",) for 0 -- the byte offset always third."""
        if value == 0:
            return ("none",)
        starts = [i for i, t in enumerate(self.inputs) if t is not None and t.numel() and t.data_ptr() == value]
        if len(starts) > 1:
            raise _Refused("two arguments at one address")
        if starts:
            return ("input", starts[0], 0)
        for kind, index, t in [*(("buffer", i, b) for i, b in enumerate(buffers)), ("counters", None, counters)]:
            if t is not None and t.numel() and 0 <= value - t.data_ptr() < t.numel() * t.element_size():
                return kind, index, value - t.data_ptr()
        raise _Refused("an address in neither an argument, a buffer nor the counters")

    def _source(self, t, buffers: list, counters) -> tuple:
        """Where a launch's tensor comes from: ("input", i), ("buffer", i), ("row", (buffer, row)),
        ("counters",) or ("none",); an Address as _address_source says."""
        if type(t) is Address:
            return self._address_source(t.value, buffers, counters)
        if t is None:
            return ("none",)
        for i, known in enumerate(self.inputs):
            if t is known:
                return ("input", i)
        for i, known in enumerate(buffers):
            if t is known:
                return ("buffer", i)
        if t is counters:
            return ("counters",)
        for b, buffer in enumerate(buffers):
            # A workspace is itself a view of a larger buffer: its rows share that buffer as their base.
            if buffer.dim() > 1 and t._base is (buffer if buffer._base is None else buffer._base):
                for r in range(buffer.shape[0]):
                    row = buffer[r]
                    if (row.data_ptr(), row.shape, row.stride()) == (t.data_ptr(), t.shape, t.stride()):
                        return ("row", (b, r))
        raise _Refused("a tensor that is neither an argument, a buffer, a row of one nor the counters")

    def replay(self, outputs: tuple) -> Replay:
        """The Replay of what was seen; _Refused when something is not accounted for."""
        if not self.complete:
            raise _Refused("a launch went through the JIT")
        present = [t for t in self.inputs if t is not None]
        if len({id(t) for t in present}) != len(present):
            raise _Refused("an argument passed twice")
        if any(launches_before for _, _, launches_before in self.copies):
            raise _Refused("a copy after a launch")
        buffers = [t for t, _ in self.buffers]
        counters = self.counters[0] if self.counters else None
        launches = [(entry, [self._source(t, buffers, counters) for t in pointers], scalars)
                    for entry, pointers, scalars in self.launches]
        returned = [self._source(t, buffers, counters) for t in outputs]
        copied = [(self._source(dst, buffers, counters), self._source(src, buffers, counters))
                  for dst, src, _ in self.copies]
        every_source = [*(s for _, sources, _ in launches for s in sources), *returned, *(s for c in copied for s in c)]
        rows = list(dict.fromkeys(s[1] for s in every_source if s[0] == "row"))
        first_row = len(self.inputs) + len(buffers)
        offsets = {"input": 0, "buffer": len(self.inputs)}

        def index(source: tuple) -> int:
            kind = source[0]
            if kind == "row":
                return first_row + rows.index(source[1])
            if kind == "counters":
                return first_row + len(rows)
            if kind == "none":
                return first_row + len(rows) + 1
            return offsets[kind] + source[1]

        def operand(source: tuple) -> tuple:
            """(pool index, byte offset) of a source."""
            return index(source), source[2] if len(source) == 3 else 0

        steps = tuple(self.home.replay_step(entry, [operand(s) for s in sources], scalars)
                      for entry, sources, scalars in launches)
        device = self.inputs[0].device
        return Replay(buffers=tuple(shape for _, shape in self.buffers),
                      allocations=tuple(_allocation(*spec, device) for _, spec in self.buffers), rows=tuple(rows),
                      copies=tuple((index(dst), index(src)) for dst, src in copied),
                      counter_groups=self.counters[1] if self.counters else 0, steps=steps,
                      outputs=picker([index(s) for s in returned]), home=self.home)


def recorded(launch, key: tuple, found, inputs: tuple, full_path, *args) -> tuple:
    """full_path(*args) -- an op's validation and orchestration, for a signature `key` that
    has no Replay on this launcher (`found`: what it has instead) -- recorded where it qualifies.
    inputs: the call's tensor arguments, in the op's order (a Replay runs on them)."""
    if found is _REFUSED:
        return full_path(*args)
    with _recording_lock:  # None, or the recordings tried so far
        with _Recording(launch, inputs) as recording:
            outputs = full_path(*args)
        try:
            result = recording.replay(outputs)
        except _Refused:
            attempts = (found or 0) + 1
            # Only a launch that went through the JIT (a first one) is worth another recording.
            result = _REFUSED if attempts >= _ATTEMPTS or recording.complete else attempts
        if len(launch.replays) >= MAX_SIGNATURES:
            launch.replays.clear()
        launch.replays[key] = result
    return outputs
