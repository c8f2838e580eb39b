#!/usr/bin/env python3
"""PostgreSQL and cluster figures: SQLite (1 node) beside PostgreSQL with 1 and
3 nodes, in one run, on one machine.

    python3 bench/cluster.py --squared target/release/squared \
        --postgres postgres://postgres@127.0.0.1:5432/postgres [--jobs 3000] [--out PATH]

For each setup it starts fresh `squared serve` nodes (a fresh database each:
a new SQLite file, or a new PostgreSQL database created through the admin URL
and dropped afterwards) and measures:

- tiny jobs: N jobs of 10 numbers from 64 keep-alive clients spread
  round-robin over the nodes (threads strategy, cores 1), closed loop:
  completed jobs per second;
- big jobs: 10^6 and 10^7 range jobs, processes over shared memory, with
  cores = 2 x nodes (so a job spreads over every node), submit -> succeeded.

All nodes share this machine's 2 cores, so 3 nodes measure the coordination
cost of the cluster, not extra capacity. Prints a Markdown section (and
appends it to --out when given). Python standard library only; reuses run.py.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the harness: Server, Http, submit, wait_done, _tiny_client)


def psql(admin_url, sql):
    subprocess.run(["psql", admin_url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql], check=True,
                   stdout=subprocess.DEVNULL)


def fresh_database(admin_url, name):
    psql(admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    psql(admin_url, f"CREATE DATABASE {name}")
    parts = urllib.parse.urlsplit(admin_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def tiny(nodes, jobs, load_client, clients=64, procs=4):
    """Closed loop over all nodes; returns completed jobs/s and a correctness count."""
    if load_client:
        # One Rust client per node (examples/tiny_load), started together, the
        # clients and jobs split evenly among them.
        procs_ = []
        for i, node in enumerate(nodes):
            cmd = [load_client, "--url", f"http://{node.host}:{node.port}", "--jobs", str(len(range(jobs)[i::len(nodes)])),
                   "--clients", str(clients // len(nodes)), "--strategy", "threads", "--mode", "closed"]
            procs_.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        parts = []
        for p in procs_:
            out, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"tiny_load exited {p.returncode}: {err[-1000:]}")
            parts.append(json.loads(out))
    else:
        ctx = multiprocessing.get_context("spawn")
        start_at = time.monotonic() + 1.5
        per = clients // procs
        work = []
        for p in range(procs):
            node = nodes[p % len(nodes)]
            work.append((node.host, node.port, "closed", list(range(jobs))[p::procs], per, start_at, "threads", 1, None, p))
        with ctx.Pool(procs) as pool:
            parts = pool.map(run._tiny_client, work)
    res = [r for part in parts for r in part["results"]]
    errors = sum(part["n_errors"] for part in parts)
    ok = sum(1 for r in res if r[4] == "succeeded")
    span = max(r[3] for r in res) - min(r[1] for r in res)
    return {"jobs": jobs, "succeeded": ok, "errors": errors, "rate": len(res) / span}


def big(nodes, n, repeats=3):
    times = []
    spread = 0
    for i in range(repeats):
        conn = nodes[i % len(nodes)].conn()
        body = json.dumps({"range": {"start": 0, "end": n}, "cores": 2 * len(nodes), "strategy": "processes"}).encode()
        t = time.monotonic()
        doc = run.submit(conn, body)
        doc = run.wait_done(conn, doc["id"])
        times.append(time.monotonic() - t)
        assert doc["status"] == "succeeded", doc
        spread = max(spread, len({c["node"] for c in doc["timing"]["chunks"]}))
        st, page = conn.request("GET", f"/v1/jobs/{doc['id']}/result?offset={n - 1}&limit=1")
        assert st == 200 and json.loads(page)["squares"] == [(n - 1) ** 2], page
        conn.close()
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "nodes_used": spread}


def setup(binary, database, count):
    return [run.Server(binary, database=database, max_numbers=10**7, extra=["--node-name", f"n{i}"])
            for i in range(count)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--squared", required=True)
    ap.add_argument("--postgres", required=True, help="admin URL; a fresh database is created beside it")
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--out", help="append the Markdown section to this file")
    ap.add_argument("--load-client", help="tiny-jobs client: PATH of examples/tiny_load, or `python` "
                    "(default: examples/tiny_load beside --squared if built, else python)")
    args = ap.parse_args()
    load_client = args.load_client
    if load_client is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(args.squared)), "examples", "tiny_load")
        load_client = beside if os.path.exists(beside) else "python"
    if load_client == "python":
        load_client = None
    rows = []
    for label, nodes_n, pg in [("SQLite", 1, False), ("PostgreSQL", 1, True), ("PostgreSQL", 3, True)]:
        name = f"squared_bench_{os.getpid()}_{nodes_n}"
        database = fresh_database(args.postgres, name) if pg else None
        run.log(f"cluster bench: {label}, {nodes_n} node(s)")
        nodes = setup(args.squared, database, nodes_n) if pg else [run.Server(args.squared, max_numbers=10**7)]
        try:
            t = tiny(nodes, args.jobs, load_client)
            b6 = big(nodes, 10**6)
            b7 = big(nodes, 10**7)
        finally:
            for node in nodes:
                node.stop()
            if pg:
                psql(args.postgres, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        rows.append((label, nodes_n, t, b6, b7))
    cmd = " ".join(["python3 bench/cluster.py", "--squared", args.squared, "--postgres", run.redact(args.postgres),
                    "--jobs", str(args.jobs)])
    out = [
        "## PostgreSQL and clusters",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `{cmd}`, on the same machine as above;",
        "every node shares its 2 cores, so 3 nodes show the cost of coordinating through PostgreSQL, not more capacity.",
        "Tiny jobs: " + ("one `examples/tiny_load` client per node, 64 connections in all, started together."
                         if load_client else "4 Python client processes, 64 connections in all, round-robin over the nodes."),
        "",
        "| database | nodes | tiny jobs/s (64 clients, threads) | succeeded | 10^6 job s (cores = 2 × nodes) | 10^7 job s | nodes a big job ran on |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, n, t, b6, b7 in rows:
        out.append(
            f"| {label} | {n} | {t['rate']:.0f} | {t['succeeded']}/{t['jobs']} | {b6['median']:.3f} ({b6['min']:.3f}–{b6['max']:.3f}) "
            f"| {b7['median']:.3f} ({b7['min']:.3f}–{b7['max']:.3f}) | {b7['nodes_used']} |"
        )
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
