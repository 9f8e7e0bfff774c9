"""What one row joining or leaving the decode rows costs, by batch size: the row pool against the
batch copies it replaced (docs/benchmark.md).

    python tools/bench_pool.py

For the char-rnn shape (2 state tensors of [2, B, 512]) and a word model's (2 x [2, B, 650]), at
B = 16 .. 1,024 rows: microseconds for one row to join and one to leave (a) through
serve/pool.py's RowPool (write slot n; move the last row into the leaver's slot) and (b) by
rebuilding the batch's state arrays, as the previous design's Batch did (np.concatenate to
join, fancy indexing to leave). The pool's cost stays flat in B; the copies grow with it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from lstmgen.serve.pool import RowPool


def per_op(fn, repeats: int) -> float:
    """Median microseconds of fn() over `repeats` runs of 50 calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        times.append((time.perf_counter() - t0) / 50 * 1e6)
    return float(np.median(times))


def pool_costs(shape: tuple[int, int], rows: int, repeats: int) -> float:
    class Owner:
        slot = -1

    pool = RowPool((shape, shape), {"token": np.int64, "u": (np.float64, 64)}, max_rows=rows + 1, capacity=rows + 1)
    pool.add([Owner() for _ in range(rows)], tuple(np.zeros((shape[0], rows, shape[1]), np.float32) for _ in range(2)))
    one = tuple(np.ones((shape[0], 1, shape[1]), np.float32) for _ in range(2))
    owner = [Owner()]

    def join_leave():
        pool.add(owner, one, token=np.ones(1, np.int64))
        pool.remove([rows // 2])  # a row in the middle leaves: the last one moves into its slot

    return per_op(join_leave, repeats)


def copy_costs(shape: tuple[int, int], rows: int, repeats: int) -> float:
    state = tuple(np.zeros((shape[0], rows, shape[1]), np.float32) for _ in range(2))
    one = tuple(np.ones((shape[0], 1, shape[1]), np.float32) for _ in range(2))
    keep = np.array([i for i in range(rows + 1) if i != rows // 2])

    def join_leave():
        joined = tuple(np.concatenate([x, y], axis=1) for x, y in zip(state, one))  # [L, B+1, H]
        return tuple(x[:, keep] for x in joined)  # [L, B, H]

    return per_op(join_leave, repeats)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="16,64,256,1024")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    out = []
    print(f"{'shape':>10} {'rows':>6} {'pool join+leave us':>19} {'copies join+leave us':>21} {'copies/pool':>12}")
    for name, shape in (("char-rnn", (2, 512)), ("ptb-medium", (2, 650))):
        for b in (int(x) for x in args.rows.split(",")):
            pool_us = pool_costs(shape, b, args.repeats)
            copy_us = copy_costs(shape, b, args.repeats)
            out.append({"shape": name, "rows": b, "pool_us": pool_us, "copies_us": copy_us})
            print(f"{name:>10} {b:>6} {pool_us:>19.1f} {copy_us:>21.1f} {copy_us / pool_us:>11.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
