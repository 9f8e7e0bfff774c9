"""A pool of rows: the model's state tensors and per-row columns, active rows kept contiguous.

Each state tensor the manifest names (an LSTM's h and c, a GRU's h) is one array [L, capacity, H];
each per-row value a scheduler keeps (the next input token, counts, sampling settings) is one
column [capacity]. The active rows are always slots 0..n-1, so a model call reads `state()` (each
[L, n, H]) and no row is ever looked up. A row joins by writing slot n and leaves by moving the
last active row into its slot: one row's bytes either way, whatever the batch size (the batch
copies of a join or a leave were the batch's size; tools/bench_pool.py measures both).

The slice [:, :n] of an [L, capacity, H] array is contiguous only when n == capacity (or L == 1):
otherwise ONNX Runtime reads a packed copy and the step's new state is copied back, two memcpys of
the batch per step (0.05 ms each for 2 x 256 x 512 floats here, under 1% of that step). At full
capacity (offline sampling's steady state) the step's output arrays become the pool's storage:
no copy at all. Capacity starts small and doubles up to `max_rows` (a server that allows 10,000
streams does not hold 10,000 rows of memory before it has them).

With IO binding (CUDA), a step's new state comes back as OrtValues on the device; the pool keeps
them there (`state()` hands them to the next step as they are) until a row joins, leaves or is
read, and only then brings them to the host: as long as the rows stay the same, no state crosses
to the host.

Owners are the objects that hold the rows (text generations, frame streams); each has a `slot`
attribute the pool keeps current.
"""
from __future__ import annotations

import numpy as np


class RowPool:
    def __init__(self, shapes: tuple[tuple[int, int], ...], columns: dict[str, np.dtype | tuple[np.dtype, int]],
                 max_rows: int, capacity: int = 64):
        self.shapes = shapes  # one row's shape per state tensor, [L, H]
        self.max_rows = max(1, max_rows)
        cap = min(max(1, capacity), self.max_rows)
        self._state = [np.zeros((layers, cap, hidden), np.float32) for layers, hidden in shapes]
        # a column is [capacity], or [capacity, width] when its spec is (dtype, width)
        self.cols: dict[str, np.ndarray] = {
            name: np.zeros((cap, spec[1]) if isinstance(spec, tuple) else cap, spec[0] if isinstance(spec, tuple) else spec)
            for name, spec in columns.items()}
        self.owners: list = []  # owners[i] holds slot i
        self._device: tuple | None = None  # the active rows' state as OrtValues (IO binding), newer than _state
        self.version = 0  # bumped by every join and leave: caches derived from the columns check it

    def __len__(self) -> int:
        return len(self.owners)

    @property
    def capacity(self) -> int:
        return self._state[0].shape[1] if self._state else len(next(iter(self.cols.values())))

    @property
    def room(self) -> int:
        return self.max_rows - len(self.owners)

    def col(self, name: str) -> np.ndarray:
        """The active rows' values of one column, [n] or [n, width] (a view: writes go to the pool)."""
        return self.cols[name][: len(self.owners)]

    def state(self) -> tuple:
        """The active rows' state tensors, each [L, n, H]: views, or OrtValues still on the device."""
        if self._device is not None:
            return self._device
        n = len(self.owners)
        return tuple(x[:, :n] for x in self._state)

    def set_state(self, new: tuple) -> None:
        """After a model call over all active rows: `new` (each [L, n, H]) becomes their state."""
        if new and not isinstance(new[0], np.ndarray):  # OrtValues on the device: kept there
            self._device = tuple(new)
            return
        self._device = None
        n = len(self.owners)
        for k, x in enumerate(new):
            if n == self.capacity and isinstance(x, np.ndarray) and x.dtype == np.float32 \
                    and x.flags.c_contiguous and x.flags.writeable and x.shape == self._state[k].shape:
                self._state[k] = x  # the call's fresh output is the storage now: no copy
            else:
                self._state[k][:, :n] = x

    def _host(self) -> None:
        """Bring a device-resident state back before the rows change or are read (IO binding)."""
        if self._device is not None:
            device, self._device = self._device, None
            n = len(self.owners)
            for x, y in zip(self._state, device):
                x[:, :n] = y.numpy()

    def _all(self, slots: np.ndarray) -> bool:
        """`slots` (ascending) are every active row, in order."""
        n = len(self.owners)
        return len(slots) == n and (n == 0 or (slots[0] == 0 and slots[-1] == n - 1))

    def gather(self, slots: np.ndarray) -> tuple:
        """The state of some active rows (ascending slots), each [L, R, H]; all of them: state()."""
        if self._all(slots):
            return self.state()
        self._host()
        return tuple(x[:, slots] for x in self._state)

    def scatter(self, slots: np.ndarray, new: tuple) -> None:
        """After a model call over the rows `slots` (as gathered): their new state."""
        if self._all(slots):
            return self.set_state(new)
        self._host()
        for x, y in zip(self._state, new):
            x[:, slots] = y if isinstance(y, np.ndarray) else y.numpy()

    def row_state(self, slot: int) -> tuple[np.ndarray, ...]:
        """A copy of one row's state, each [L, H]."""
        self._host()
        return tuple(x[:, slot].copy() for x in self._state)

    def add(self, owners: list, state: tuple[np.ndarray, ...], **values: np.ndarray) -> None:
        """Rows join at slots n..n+R-1: `state` each [L, R, H], a value [R] per column named in
        `values` (other columns start at 0; a 2-D column's value is [R, width]). Writes R rows; the caller checked everything first."""
        r, n = len(owners), len(self.owners)
        self._host()
        if n + r > self.max_rows:
            raise ValueError(f"the pool holds at most {self.max_rows} rows; {n} + {r} asked")
        if n + r > self.capacity:
            self._grow(n + r)
        for x, s in zip(self._state, state):
            x[:, n : n + r] = s
        for name, col in self.cols.items():
            col[n : n + r] = values[name] if name in values else 0
        for i, o in enumerate(owners):
            o.slot = n + i
        self.owners.extend(owners)
        self.version += 1

    def remove(self, slots) -> None:
        """The rows at `slots` leave; the last active rows move into their places (one row each)."""
        self._host()
        for s in sorted(set(slots), reverse=True):  # highest first: a moved row is never one leaving
            last = len(self.owners) - 1
            self.owners[s].slot = -1
            moved = self.owners.pop()
            if s != last:
                for x in self._state:
                    x[:, s] = x[:, last]
                for col in self.cols.values():
                    col[s] = col[last]
                self.owners[s] = moved
                moved.slot = s
        self.version += 1

    def _grow(self, need: int) -> None:
        cap = self.capacity
        while cap < need:
            cap *= 2
        cap = min(cap, self.max_rows)
        n = len(self.owners)
        state = [np.zeros((x.shape[0], cap, x.shape[2]), np.float32) for x in self._state]
        for new, old in zip(state, self._state):
            new[:, :n] = old[:, :n]
        for name, old in self.cols.items():
            col = np.zeros((cap, *old.shape[1:]), old.dtype)
            col[:n] = old[:n]
            self.cols[name] = col
        self._state = state
