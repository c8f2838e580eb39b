#!/usr/bin/env python3
"""The seed note's Python patterns, as pure compute, each timed.

The seed note ("multiprocessing or multithreading?") squares numbers in
parallel several ways. This script reproduces those patterns without the
note's print() and time.sleep() calls, so what is timed is the cost of the
pattern itself, and checks every result against the closed-form sum of
squares (and spot-checks positions) so that nothing can be faked.

Patterns (numbers are range(0, N)):

  process_per_number  one multiprocessing.Process per number writing into a
                      shared multiprocessing.Array (the note's first example).
                      Only run for N <= --per-number-cap (default 10,000).
  chunked_array       `cores` processes, each squaring its chunk and writing
                      element by element into a shared
                      multiprocessing.Array('q', N) (the note's second example;
                      'q' instead of the note's 'i' because n*n overflows 32
                      bits from n = 46,341).
  chunked_queue       `cores` processes, each putting its list of squares on a
                      multiprocessing.Queue (the note's third example). The
                      queue is drained BEFORE join(): the note joins first,
                      which deadlocks once a child's list no longer fits the
                      pipe buffer (it hangs at N = 10^6).
  pool_map            multiprocessing.Pool(cores).map(square, numbers,
                      chunksize) -- the idiomatic stdlib way.
  list_comprehension  [n * n for n in range(N)] in this one process.

Each timing covers what the note's @timeit covers: from the start of the
call until the squares are in a Python list in the parent (process start-up,
compute, transfer, collection).

    python3 bench/seed.py --n 1000000 --cores 2 --repeats 3 --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time

PATTERNS = ["process_per_number", "chunked_array", "chunked_queue", "pool_map", "list_comprehension"]


# --------------------------------------------------------------------------
# The patterns. Worker functions are module-level so they pickle for Pool.


def _square_into(n, result, index):
    result[index] = n * n


def process_per_number(numbers, cores):
    """The note's first example: a process per number (cores is ignored)."""
    result = multiprocessing.Array("q", len(numbers))
    processes = []
    for i, n in enumerate(numbers):
        p = multiprocessing.Process(target=_square_into, args=(n, result, i))
        processes.append(p)
        p.start()
    for p in processes:
        p.join()
    # result[:] copies the whole array under one lock acquisition; the note's
    # list(result) takes the lock once per element and is much slower.
    return result[:]


def _split(count, cores):
    """The note's split: count // workers each, remainder over the first."""
    process_count = max(1, min(cores, count))
    chunk_size, extra = divmod(count, process_count)
    bounds, start = [], 0
    for _ in range(process_count):
        end = start + chunk_size + (1 if extra > 0 else 0)
        extra -= 1
        bounds.append((start, end))
        start = end
    return bounds


def _square_chunk_array(chunk, result, offset):
    # As in the note: one locked write into the shared array per number.
    for i, n in enumerate(chunk):
        result[i + offset] = n * n


def chunked_array(numbers, cores):
    """The note's second example: chunks written into a shared Array."""
    result = multiprocessing.Array("q", len(numbers))
    processes = []
    for start, end in _split(len(numbers), cores):
        p = multiprocessing.Process(target=_square_chunk_array, args=(numbers[start:end], result, start))
        processes.append(p)
        p.start()
    for p in processes:
        p.join()
    return result[:]


def _square_chunk_queue(chunk, offset, queue):
    queue.put((offset, [n * n for n in chunk]))


def chunked_queue(numbers, cores):
    """The note's third example, drained before join() (the note's order deadlocks)."""
    queue = multiprocessing.Queue()
    processes = []
    bounds = _split(len(numbers), cores)
    for start, end in bounds:
        p = multiprocessing.Process(target=_square_chunk_queue, args=(numbers[start:end], start, queue))
        processes.append(p)
        p.start()
    # Drain first: a child cannot exit while its pickled list is still in the
    # pipe, so join() before get() would wait forever on large chunks.
    parts = [queue.get() for _ in bounds]
    for p in processes:
        p.join()
    # The note extends in arrival order, which can scramble the result;
    # reassemble in input order instead.
    parts.sort(key=lambda part: part[0])
    squared = []
    for _, part in parts:
        squared.extend(part)
    return squared


def _square(n):
    return n * n


def pool_map(numbers, cores, chunksize=None):
    if chunksize is None:
        chunksize = max(1, len(numbers) // (cores * 4))
    with multiprocessing.Pool(cores) as pool:
        return pool.map(_square, numbers, chunksize)


def list_comprehension(numbers, cores):
    return [n * n for n in numbers]


# --------------------------------------------------------------------------


def sum_of_squares(n):
    """sum(k*k for k in range(n))."""
    return (n - 1) * n * (2 * n - 1) // 6


def check(result, n):
    if len(result) != n:
        raise AssertionError(f"expected {n} squares, got {len(result)}")
    if sum(result) != sum_of_squares(n):
        raise AssertionError("sum of squares does not match the closed form")
    rng = random.Random(n)
    for i in [0, n - 1] + [rng.randrange(n) for _ in range(100)]:
        if result[i] != i * i:
            raise AssertionError(f"result[{i}] = {result[i]}, expected {i * i}")


def run(n, cores, repeats, patterns, per_number_cap, chunksize=None):
    numbers = range(0, n)
    out = {
        "n": n,
        "cores": cores,
        "repeats": repeats,
        "python": platform.python_version(),
        "start_method": multiprocessing.get_start_method(),
        "patterns": {},
    }
    for name in patterns:
        if name == "process_per_number" and n > per_number_cap:
            out["patterns"][name] = {
                "skipped": f"N = {n:,} is above the process-per-number cap of {per_number_cap:,} (one OS process per number)"
            }
            continue
        fn = globals()[name]
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            if name == "pool_map":
                result = fn(numbers, cores, chunksize)
            else:
                result = fn(numbers, cores)
            elapsed = time.perf_counter() - t0
            check(result, n)
            del result
            runs.append(elapsed)
        out["patterns"][name] = {
            "median_s": statistics.median(runs),
            "min_s": min(runs),
            "max_s": max(runs),
            "runs_s": runs,
            "checked": True,
        }
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="square range(0, N) (default 10^6)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="processes per pattern")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated subset of " + ", ".join(PATTERNS))
    ap.add_argument("--per-number-cap", type=int, default=10_000, help="largest N for process_per_number")
    ap.add_argument("--chunksize", type=int, default=None, help="Pool.map chunksize (default N / (4 * cores))")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    for p in patterns:
        if p not in PATTERNS:
            ap.error(f"unknown pattern {p!r}; choose from {', '.join(PATTERNS)}")
    if args.n < 1 or args.cores < 1 or args.repeats < 1:
        ap.error("--n, --cores and --repeats must be >= 1")

    out = run(args.n, args.cores, args.repeats, patterns, args.per_number_cap, args.chunksize)
    if args.json:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"N = {out['n']:,}, cores = {out['cores']}, repeats = {out['repeats']}, Python {out['python']}")
        for name, r in out["patterns"].items():
            if "skipped" in r:
                print(f"  {name:20s} skipped: {r['skipped']}")
            else:
                print(f"  {name:20s} median {r['median_s']:.4f} s  (min {r['min_s']:.4f}, max {r['max_s']:.4f})  checked")


if __name__ == "__main__":
    main()
