#!/usr/bin/env python3
"""Benchmark harness for squared: one command, one Markdown report.

    python3 bench/run.py --squared target/release/squared [--quick] [--postgres URL] [--out BENCHMARKS.md]

It starts its own `squared serve` (port 0, a fresh SQLite file in a temporary
directory, restarted between cases so peak RSS is per case), runs every case,
runs the seed note's Python patterns (bench/seed.py) on the same numbers in
the same run, and writes the report. Python 3.11 standard library only.
See bench/README.md for what each case measures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import math
import multiprocessing
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
TERMINAL = {"succeeded", "failed", "canceled"}
STRATEGIES = [  # (label, body fields)
    ("sequential", {"strategy": "sequential"}),
    ("threads", {"strategy": "threads"}),
    ("processes/shm", {"strategy": "processes", "transport": "shared_memory"}),
    ("processes/pipe", {"strategy": "processes", "transport": "pipe"}),
]
TARGET_LABEL = "processes/shm"  # the configuration the issue's targets name
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Statistics


def summary(xs):
    xs = list(xs)
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def percentile(xs, p):
    """Nearest-rank percentile."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def _digits(x, digits):
    """At least `digits` decimals, more for small values so 3 significant figures show."""
    if x and x > 0 and math.isfinite(x):
        return max(digits, 2 - math.floor(math.log10(x)))
    return digits


def fmt_s(st, digits=3):
    if not st:
        return "—"
    d = _digits(st["min"], digits)
    if st["n"] == 1:
        return f"{st['median']:.{d}f}"
    return f"{st['median']:.{d}f} ({st['min']:.{d}f}–{st['max']:.{d}f})"


def cores_s(n):
    return f"{n} core" + ("" if n == 1 else "s")


def fmt_ms(st, digits=1):
    if not st:
        return "—"
    return fmt_s({k: (v * 1000 if k != "n" else v) for k, v in st.items()}, digits)


def human(n):
    for exp, name in ((8, "10^8"), (7, "10^7"), (6, "10^6")):
        if n == 10**exp:
            return name
    return f"{n:,}"


# ---------------------------------------------------------------------------
# A minimal keep-alive HTTP/1.1 client on a raw socket: http.client parses
# headers with the email package and costs several times more CPU per
# request, which matters when client and server share two cores.


class Http:
    def __init__(self, host, port, timeout=120.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.sock = None
        self.buf = b""
        self.hosthdr = f"Host: {host}:{port}\r\n".encode()

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock, self.buf = None, b""

    def _connect(self):
        s = socket.create_connection((self.host, self.port), timeout=self.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buf = s, b""

    def request(self, method, path, body=None, headers=b""):
        """Returns (status, body bytes)."""
        head = [f"{method} {path} HTTP/1.1\r\n".encode(), self.hosthdr, headers]
        if body is not None:
            head.append(b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body))
        head.append(b"\r\n")
        data = b"".join(head) + (body or b"")
        for attempt in range(2):
            fresh = self.sock is None
            if fresh:
                self._connect()
            try:
                self.sock.sendall(data)
                return self._response()
            except (ConnectionError, socket.timeout, OSError) as e:
                got_nothing = isinstance(e, _NoResponse)
                self.close()
                # Retry once only when a reused connection was closed before
                # it answered anything (never a POST that may have landed).
                if attempt == 0 and not fresh and got_nothing:
                    continue
                raise

    def _recv(self):
        chunk = self.sock.recv(262144)
        if not chunk:
            raise _NoResponse("connection closed") if not self.buf and not self._started else ConnectionError("closed")
        self.buf += chunk

    def _response(self):
        self._started = False
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                break
            self._recv()
            self._started = True
        head, self.buf = self.buf[:i], self.buf[i + 4 :]
        lines = head.split(b"\r\n")
        status = int(lines[0][9:12])
        length, chunked, close = None, False, False
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            k = k.strip().lower()
            if k == b"content-length":
                length = int(v)
            elif k == b"transfer-encoding" and b"chunked" in v.lower():
                chunked = True
            elif k == b"connection" and b"close" in v.lower():
                close = True
        if status in (204, 304) or 100 <= status < 200:
            body = b""
        elif chunked:
            parts = []
            while True:
                while b"\r\n" not in self.buf:
                    self._recv()
                j = self.buf.find(b"\r\n")
                size = int(self.buf[:j].split(b";")[0], 16)
                self.buf = self.buf[j + 2 :]
                while len(self.buf) < size + 2:
                    self._recv()
                parts.append(self.buf[:size])
                self.buf = self.buf[size + 2 :]
                if size == 0:
                    break
            body = b"".join(parts)
        elif length is not None:
            while len(self.buf) < length:
                self._recv()
            body, self.buf = self.buf[:length], self.buf[length:]
        else:
            try:
                while True:
                    self._recv()
            except ConnectionError:
                pass
            body, self.buf = self.buf, b""
            close = True
        if close:
            self.close()
        return status, body

    _started = False


class _NoResponse(ConnectionError):
    pass


def submit(conn, body_bytes):
    st, body = conn.request("POST", "/v1/jobs", body_bytes)
    if st not in (200, 201, 202):
        raise RuntimeError(f"POST /v1/jobs answered {st}: {body[:300]!r}")
    return json.loads(body)


def wait_done(conn, job_id, per_poll=60):
    while True:
        st, body = conn.request("GET", f"/v1/jobs/{job_id}?wait={per_poll}")
        if st != 200:
            raise RuntimeError(f"GET job answered {st}: {body[:300]!r}")
        doc = json.loads(body)
        if doc["status"] in TERMINAL:
            return doc


# ---------------------------------------------------------------------------
# The server under test


def proc_stat_cpu(pid):
    """(own CPU s, reaped children CPU s) of a process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ut, st, cut, cst = (int(x) for x in fields[11:15])
        return (ut + st) / CLK_TCK, (cut + cst) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0


def proc_status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                try:
                    with open(f"/proc/{p}/task/{tid}/children") as f:
                        kids = [int(x) for x in f.read().split()]
                except OSError:
                    continue
                out.extend(kids)
                todo.extend(kids)
        except OSError:
            pass
    return out


class Server:
    """`squared serve` on port 0 with its own database; samples memory."""

    def __init__(self, binary, database=None, max_numbers=None, extra=()):
        self.binary = binary
        self.tmp = tempfile.mkdtemp(prefix="squared-bench-")
        self._sampling = None
        self.worker_peak_kb = self.total_peak_kb = 0
        self.database = database or f"sqlite://{self.tmp}/squared.db"
        cmd = [binary, "serve", "--listen", "127.0.0.1:0", "--database", self.database]
        if max_numbers:
            cmd += ["--max-numbers", str(max_numbers)]
        cmd += list(extra)
        self.cmd = cmd
        self.errlog = open(os.path.join(self.tmp, "stderr.log"), "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.errlog, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        line = self._first_line(timeout=60)
        if not line or "listening on http://" not in line:
            err = self.stderr_tail()
            self.stop()
            raise ServerFailed(f"squared serve did not start: {err or repr(line)}")
        addr = line.split("http://", 1)[1].strip().rstrip("/")
        self.host, _, port = addr.rpartition(":")
        self.port = int(port)
        self.url = f"http://{addr}"
        threading.Thread(target=self._drain, daemon=True).start()
        self._sampling = None
        self.worker_peak_kb = 0
        self.total_peak_kb = 0

    def _first_line(self, timeout):
        result = []
        t = threading.Thread(target=lambda: result.append(self.proc.stdout.readline().decode(errors="replace")), daemon=True)
        t.start()
        t.join(timeout)
        return result[0] if result else None

    def _drain(self):
        try:
            for _ in self.proc.stdout:
                pass
        except (OSError, ValueError):
            pass

    def stderr_tail(self, n=600):
        """The error the server printed, without a Rust backtrace, on one line."""
        try:
            self.errlog.flush()
            with open(os.path.join(self.tmp, "stderr.log"), "rb") as f:
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        text = text.split("Stack backtrace:")[0].split("stack backtrace:")[0]
        return " ".join(line.strip() for line in text.splitlines() if line.strip())[-n:]

    def conn(self):
        return Http(self.host, self.port)

    def hwm_mb(self):
        return proc_status_kb(self.pid, "VmHWM") / 1024

    def cpu(self):
        own, kids = proc_stat_cpu(self.pid)
        return own + kids

    def start_sampling(self, period=0.02):
        """Samples the RSS of the server's worker subprocesses (VmHWM covers the server itself)."""
        self.worker_peak_kb = 0
        self.total_peak_kb = 0
        stop = threading.Event()

        def loop():
            while not stop.is_set():
                kids = descendants(self.pid)
                w = sum(proc_status_kb(k, "VmRSS") for k in kids)
                self.worker_peak_kb = max(self.worker_peak_kb, w)
                self.total_peak_kb = max(self.total_peak_kb, w + proc_status_kb(self.pid, "VmRSS"))
                stop.wait(period)

        th = threading.Thread(target=loop, daemon=True)
        th.start()
        self._sampling = (stop, th)

    def stop_sampling(self):
        if self._sampling:
            stop, th = self._sampling
            stop.set()
            th.join()
            self._sampling = None
        return self.worker_peak_kb / 1024

    def stop(self):
        self.stop_sampling()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.errlog.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class ServerFailed(RuntimeError):
    pass


# ---------------------------------------------------------------------------
# Big jobs


def run_big_job(srv, n, fields, cores, verify=True):
    conn = srv.conn()
    body = json.dumps({"range": {"start": 0, "end": n}, "cores": cores, **fields}).encode()
    t0 = time.perf_counter()
    doc = submit(conn, body)
    done = wait_done(conn, doc["id"])
    t1 = time.perf_counter()
    if done["status"] != "succeeded":
        raise RuntimeError(f"job {doc['id']} ended {done['status']}: {json.dumps(done.get('error'))[:300]}")
    if verify:
        rng = random.Random(n)
        for off in [0, n - 3] + [rng.randrange(n - 3) for _ in range(3)]:
            st, b = conn.request("GET", f"/v1/jobs/{doc['id']}/result?offset={off}&limit=3")
            page = json.loads(b)
            want = [i * i for i in range(off, off + 3)]
            if st != 200 or page["squares"] != want or page["count"] != n:
                raise RuntimeError(f"wrong result page at {off}: {page}")
    conn.close()
    timing = done.get("timing") or {}
    return {"id": doc["id"], "e2e_s": t1 - t0, "timing": {k: v for k, v in timing.items() if k != "chunks"}}


def delete_job(srv, job_id):
    conn = srv.conn()
    st, _ = conn.request("DELETE", f"/v1/jobs/{job_id}")
    conn.close()
    return st


def download(srv, job_id, n, ndjson):
    """Stream the whole result to nowhere; returns (seconds, bytes, client CPU s)."""
    hc = http.client.HTTPConnection(srv.host, srv.port, timeout=600)
    headers = {"Accept": "application/x-ndjson"} if ndjson else {"Accept": "application/json"}
    buf = bytearray(1 << 20)
    mv = memoryview(buf)
    total = newlines = commas = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    hc.request("GET", f"/v1/jobs/{job_id}/result", headers=headers)
    resp = hc.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"result answered {resp.status}")
    while True:
        k = resp.readinto(mv)
        if not k:
            break
        total += k
        chunk = mv[:k]
        if ndjson:
            newlines += bytes(chunk).count(b"\n")
        else:
            commas += bytes(chunk).count(b",")
    t1 = time.perf_counter()
    cpu = time.process_time() - c0
    hc.close()
    # Count check (every square must be there): one line per square, or n-1
    # commas between squares plus the few of the envelope.
    if ndjson and newlines not in (n, n - 1):
        raise RuntimeError(f"NDJSON had {newlines} lines for {n} squares")
    if not ndjson and not (n - 1 <= commas <= n + 8):
        raise RuntimeError(f"JSON had {commas} commas for {n} squares")
    return t1 - t0, total, cpu


def bench_big_jobs(cfg, database=None, tag="sqlite"):
    """Every (N, strategy, cores) cell on a fresh server; downloads on one cell per N."""
    cells = []
    downloads = []
    for n in cfg.sizes:
        repeats = cfg.repeats_for(n)
        for label, fields in STRATEGIES:
            for cores in cfg.cores_list:
                if label == "sequential" and cores != 1:
                    continue  # one thread whatever `cores` says
                log(f"[{tag}] big job N={human(n)} {label} cores={cores} x{repeats}")
                srv = Server(cfg.binary, database=database, max_numbers=max(cfg.sizes))
                try:
                    srv.start_sampling()
                    # One unmeasured 10^6-number job first: a fresh database
                    # file and WAL make the first writes of a server slower.
                    warm = run_big_job(srv, min(n, 10**6), fields, cores)
                    delete_job(srv, warm["id"])
                    runs = []
                    keep = None
                    for r in range(repeats):
                        res = run_big_job(srv, n, fields, cores)
                        runs.append(res)
                        do_dl = label == TARGET_LABEL and cores == max(cfg.cores_list) and r == repeats - 1
                        if do_dl:
                            keep = res["id"]
                        else:
                            delete_job(srv, res["id"])
                    job_hwm = srv.hwm_mb()
                    worker_peak = srv.stop_sampling()
                    cell = {
                        "n": n,
                        "strategy": label,
                        "cores": cores,
                        "e2e": summary(r["e2e_s"] for r in runs),
                        "wall": summary(r["timing"].get("wall_ms", float("nan")) / 1000 for r in runs),
                        "store": summary(r["timing"].get("store_ms", float("nan")) / 1000 for r in runs),
                        "compute": summary(r["timing"].get("compute_ms", float("nan")) / 1000 for r in runs),
                        "server_hwm_mb": job_hwm,
                        "workers_peak_mb": worker_peak,
                    }
                    cells.append(cell)
                    if keep:
                        for ndjson in (False, True):
                            dls = [download(srv, keep, n, ndjson) for _ in range(cfg.dl_repeats_for(n))]
                            downloads.append(
                                {
                                    "n": n,
                                    "format": "NDJSON" if ndjson else "JSON",
                                    "time": summary(d[0] for d in dls),
                                    "bytes": dls[0][1],
                                    "client_cpu": statistics.median(d[2] for d in dls),
                                }
                            )
                        downloads[-1]["server_hwm_mb"] = downloads[-2]["server_hwm_mb"] = srv.hwm_mb()
                        delete_job(srv, keep)
                finally:
                    srv.stop()
    return cells, downloads


# ---------------------------------------------------------------------------
# Seed patterns


def run_seed(n, cores, repeats, patterns=None):
    cmd = [sys.executable, os.path.join(HERE, "seed.py"), "--n", str(n), "--cores", str(cores), "--repeats", str(repeats), "--json"]
    if patterns:
        cmd += ["--patterns", ",".join(patterns)]
    log(f"seed patterns N={human(n)} cores={cores} x{repeats}")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


# ---------------------------------------------------------------------------
# Tiny jobs: 64 keep-alive connections, from examples/tiny_load (one Rust
# process on one thread) or, as a fallback, from Python client processes


def _tiny_client(args):
    """One client process: `threads` connections; closed loop or open loop."""
    (host, port, mode, jobs, threads, start_at, strategy, cores, rate, per_proc_offset) = args
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    out = []  # (index, intended, sent, done, status, created_at, finished_at)
    lock = threading.Lock()
    errors = []

    def body_for(i):
        return json.dumps({"numbers": list(range(i * 10, i * 10 + 10)), "strategy": strategy, "cores": cores}).encode()

    if mode == "closed":
        shares = [jobs[t::threads] for t in range(threads)]

        def worker(share):
            conn = Http(host, port)
            mine = []
            try:
                conn.request("GET", "/healthz")
                while time.monotonic() < start_at:
                    time.sleep(min(0.01, max(0.0, start_at - time.monotonic())))
                for i in share:
                    b = body_for(i)
                    t = time.monotonic()
                    doc = submit(conn, b)
                    mine.append((i, t, t, doc["id"]))
                for i, t, _, jid in mine:
                    d = wait_done(conn, jid)
                    now = time.monotonic()
                    with lock:
                        out.append((i, t, t, now, d["status"], d.get("created_at"), d.get("finished_at"), jid))
            except Exception as e:  # reported, never hidden
                errors.append(repr(e))
            finally:
                conn.close()

        ths = [threading.Thread(target=worker, args=(s,)) for s in shares]
    else:
        todo = list(jobs)
        todo.reverse()

        def worker():
            conn = Http(host, port)
            try:
                conn.request("GET", "/healthz")
                while True:
                    with lock:
                        if not todo:
                            return
                        i = todo.pop()
                    intended = start_at + i / rate
                    delay = intended - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    sent = time.monotonic()
                    doc = submit(conn, body_for(i))
                    d = wait_done(conn, doc["id"])
                    now = time.monotonic()
                    with lock:
                        out.append((i, intended, sent, now, d["status"], d.get("created_at"), d.get("finished_at"), doc["id"]))
            except Exception as e:
                errors.append(repr(e))
            finally:
                conn.close()

        ths = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"results": out, "cpu": cpu, "errors": errors[:5], "n_errors": len(errors)}


def _iso(ts):
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() if ts else None


def tiny_client_python(srv, cfg, mode, njobs, strategy, rate):
    """The Python client: `cfg.client_procs` processes of `_tiny_client`.
    Returns (parts, start_at) with parts shaped as `_tiny_client` returns them."""
    procs, per = cfg.client_procs, cfg.clients // cfg.client_procs
    ctx = multiprocessing.get_context("spawn")
    start_at = time.monotonic() + 1.5  # after every client process is up and connected
    jobs_all = list(range(njobs))
    work = [
        (srv.host, srv.port, mode, jobs_all[p::procs], per, start_at, strategy, cfg.tiny_cores, rate, p)
        for p in range(procs)
    ]
    with ctx.Pool(procs) as pool:
        return pool.map(_tiny_client, work), start_at


def tiny_client_rust(srv, cfg, mode, njobs, strategy, rate):
    """examples/tiny_load: the same jobs and loops as `_tiny_client` from one
    process; its times are on CLOCK_MONOTONIC, the clock of time.monotonic()."""
    cmd = [cfg.load_client, "--url", f"http://{srv.host}:{srv.port}", "--jobs", str(njobs), "--clients", str(cfg.clients),
           "--strategy", strategy, "--cores", str(cfg.tiny_cores), "--mode", mode, "--threads", str(cfg.client_threads)]
    if rate is not None:
        cmd += ["--rate", repr(rate)]
    p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {p.returncode}: {p.stderr[-1000:]}")
    d = json.loads(p.stdout)
    return [d], d["start_at"]


def tiny_client_desc(cfg):
    """One phrase, for the report, naming the client that sent the tiny jobs."""
    if cfg.load_client:
        threads = f"{cfg.client_threads} tokio thread" + ("s" if cfg.client_threads != 1 else "")
        return (f"{cfg.clients} concurrent keep-alive HTTP/1.1 connections from one Rust client process "
                f"(`examples/tiny_load.rs`: reqwest, {threads})")
    return (f"{cfg.clients} concurrent keep-alive HTTP/1.1 connections from {cfg.client_procs} Python client processes "
            f"({cfg.clients // cfg.client_procs} threads each, a raw-socket client)")


def tiny_run(srv, cfg, mode, njobs, strategy, rate=None):
    client = tiny_client_rust if cfg.load_client else tiny_client_python
    cpu0, w0 = srv.cpu(), time.monotonic()
    parts, start_at = client(srv, cfg, mode, njobs, strategy, rate)
    w1 = time.monotonic()
    server_cpu = srv.cpu() - cpu0
    res = [r for p in parts for r in p["results"]]
    errs = [e for p in parts for e in p["errors"]]
    n_err = sum(p["n_errors"] for p in parts)
    client_cpu = sum(p["cpu"] for p in parts)
    ok = sum(1 for r in res if r[4] == "succeeded")
    if not res:
        raise RuntimeError(f"no tiny job finished: {errs}")
    first = min(r[1] for r in res)
    last = max(r[3] for r in res)
    span = last - first
    created = [_iso(r[5]) for r in res if r[5]]
    finished = [_iso(r[6]) for r in res if r[6]]
    server_span = (max(finished) - min(created)) if created and finished else float("nan")
    # Spot-check a few results for exactness.
    conn = srv.conn()
    for r in random.Random(7).sample(res, min(20, len(res))):
        if r[4] != "succeeded":
            continue
        st, b = conn.request("GET", f"/v1/jobs/{r[7]}/result")
        want = [k * k for k in range(r[0] * 10, r[0] * 10 + 10)]
        if st != 200 or json.loads(b)["squares"] != want:
            raise RuntimeError(f"tiny job {r[7]} has a wrong result: {b[:200]!r}")
    conn.close()
    # The phase runs from the agreed start instant to the last job seen ended
    # (client CPU is counted from each Python client function's start, after
    # imports; the Rust client counts from just before the start instant).
    phase = last - start_at
    out = {
        "strategy": strategy,
        "jobs": njobs,
        "finished": len(res),
        "succeeded": ok,
        "client_errors": n_err,
        "error_samples": errs[:3],
        "span_s": span,
        "rate_client": len(res) / span if span > 0 else float("nan"),
        "rate_server": len(finished) / server_span if server_span and server_span > 0 else float("nan"),
        "client_cpu_s": client_cpu,
        "client_cores": client_cpu / max(phase, 1e-9),
        "server_cpu_s": server_cpu,
        "server_cores": server_cpu / max(phase, 1e-9),
        "wall_s": w1 - w0,
    }
    if mode == "open":
        lat = [r[3] - r[1] for r in res]
        lat_sent = [r[3] - r[2] for r in res]
        late = [r[2] - r[1] for r in res]
        out.update(
            {
                "target_rate": rate,
                "achieved_rate": len(res) / span if span > 0 else float("nan"),
                "p50": percentile(lat, 50),
                "p99": percentile(lat, 99),
                "max": max(lat),
                "p50_sent": percentile(lat_sent, 50),
                "p99_sent": percentile(lat_sent, 99),
                "late_p99": percentile(late, 99),
            }
        )
    return out


def bench_tiny(cfg, database=None, tag="sqlite"):
    out = []
    for strategy in ("threads", "processes"):
        log(f"[{tag}] tiny jobs closed loop: {cfg.tiny_jobs} x 10 numbers, {strategy}, {cfg.clients} clients")
        srv = Server(cfg.binary, database=database)
        try:
            srv.start_sampling()
            closed = tiny_run(srv, cfg, "closed", cfg.tiny_jobs, strategy)
            closed["server_hwm_mb"] = srv.hwm_mb()
            closed["workers_peak_mb"] = srv.stop_sampling()
        finally:
            srv.stop()
        rate = max(1.0, closed["rate_client"] / 2)
        n_open = max(50, min(int(rate * cfg.open_seconds), 20000))
        log(f"[{tag}] tiny jobs open loop: {n_open} jobs at {rate:.0f}/s, {strategy}")
        srv = Server(cfg.binary, database=database)
        try:
            opened = tiny_run(srv, cfg, "open", n_open, strategy, rate=rate)
            opened["server_hwm_mb"] = srv.hwm_mb()
        finally:
            srv.stop()
        out.append({"strategy": strategy, "closed": closed, "open": opened})
    return out


# ---------------------------------------------------------------------------
# Idle latency, spin scaling


def bench_idle(cfg, database=None, tag="sqlite"):
    out = []
    srv = Server(cfg.binary, database=database)
    try:
        conn = srv.conn()
        for strategy in ("threads", "processes"):
            log(f"[{tag}] idle latency: {cfg.idle_jobs} sequential 10-number jobs, {strategy}")
            lat = []
            for i in range(cfg.idle_jobs + 5):
                body = json.dumps({"numbers": list(range(10)), "strategy": strategy, "cores": cfg.tiny_cores}).encode()
                t0 = time.perf_counter()
                doc = submit(conn, body)
                d = wait_done(conn, doc["id"])
                t1 = time.perf_counter()
                if d["status"] != "succeeded":
                    raise RuntimeError(f"idle job ended {d['status']}")
                if i >= 5:  # the first few warm up the connection and the database
                    lat.append(t1 - t0)
            out.append({"strategy": strategy, "n": len(lat), "p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": max(lat)})
        conn.close()
    finally:
        srv.stop()
    return out


def bench_spin(cfg):
    out = []
    srv = Server(cfg.binary)
    try:
        for label, fields in STRATEGIES[1:3]:
            row = {"strategy": label}
            for cores in (1, 2):
                log(f"spin job {cfg.spin_numbers} numbers x spin {cfg.spin}, {label}, cores={cores} x{cfg.repeats}")
                times, walls = [], []
                for _ in range(cfg.repeats):
                    conn = srv.conn()
                    body = json.dumps(
                        {"range": {"start": 0, "end": cfg.spin_numbers}, "cores": cores, "simulate": {"spin": cfg.spin}, **fields}
                    ).encode()
                    t0 = time.perf_counter()
                    doc = submit(conn, body)
                    d = wait_done(conn, doc["id"])
                    times.append(time.perf_counter() - t0)
                    if d["status"] != "succeeded":
                        raise RuntimeError(f"spin job ended {d['status']}: {d.get('error')}")
                    walls.append(d["timing"]["wall_ms"] / 1000)
                    conn.close()
                row[cores] = summary(times)
                row[f"wall{cores}"] = summary(walls)
            row["speedup"] = row[1]["median"] / row[2]["median"]
            out.append(row)
    finally:
        srv.stop()
    return out


# ---------------------------------------------------------------------------
# Environment


def machine():
    info = {"cores": os.cpu_count(), "cpu": "unknown", "mem_gb": None, "kernel": platform.release()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["mem_gb"] = proc_meminfo("MemTotal") / 1024 / 1024
    try:
        info["affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    return info


def proc_meminfo(key):
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def git_commit(binary):
    d = os.path.dirname(os.path.realpath(binary))
    try:
        top = subprocess.run(["git", "-C", d, "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
        head = subprocess.run(["git", "-C", top, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", top, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else ""), top
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown (binary is not inside a git checkout)", None


# ---------------------------------------------------------------------------
# Report


def verdict(ok):
    return "PASS" if ok else "FAIL"


def build_report(cfg, env, R):
    L = []
    a = L.append
    a("# squared benchmarks\n")
    a(f"Generated {env['date']} by `bench/run.py` in {env['duration_s'] / 60:.1f} min.\n")
    a("```sh")
    a(env["command"])
    a("```\n")
    m = env["machine"]
    a(f"- Machine: {m['cores']} cores ({m.get('affinity', m['cores'])} usable), {m['cpu']}, {m['mem_gb']:.1f} GiB RAM, Linux {m['kernel']}")
    a(f"- squared: commit {env['commit']}, binary `{env['binary']}`")
    if env.get("load"):
        (b1, _, _), (e1, _, _) = env["load"]
        a(f"- Load average (1 min) before the run {b1:.2f}, after {e1:.2f} (other work on the machine skews every figure)")
    py = f"Python {platform.python_version()} (stdlib only)"
    who = f"tiny jobs over {tiny_client_desc(cfg)}, `{cfg.load_client}`; every other case from {py}" if cfg.load_client else f"{py} for every case"
    a(f"- Client: {who}; server and client share the same cores")
    a(
        f"- Mode: {'--quick' if cfg.quick else 'full'}; big jobs {', '.join(human(n) for n in cfg.sizes)} numbers, "
        f"{cfg.repeats} repeat(s)" + (f" ({cfg.repeats_for(10**8)} for 10^8)" if 10**8 in cfg.sizes and cfg.repeats_for(10**8) != cfg.repeats else "")
        + f"; seed process-per-number at N = {cfg.seed_small:,}; tiny jobs {cfg.tiny_jobs:,}; idle jobs {cfg.idle_jobs}\n"
    )
    a("Every figure is the median, with min–max over the repeats in parentheses. "
      "Each case runs on a freshly started server with an empty SQLite database, so peak RSS (VmHWM) is per case.\n")

    # ---- targets
    a("## Targets\n")
    a("```")
    for line in R["targets"]:
        a(line)
    a("```\n")

    # ---- big jobs
    cells = R["big"]
    a("## Big range jobs, end to end (SQLite)\n")
    a("Submit→succeeded is measured by the client from `POST /v1/jobs` to the long-poll (`?wait=60`) answer showing `succeeded`; "
      "the job is stored and every square is on disk by then. `wall` is the server's `timing.wall_ms` (run only, no queue/HTTP). "
      "`sequential` is one thread whatever `cores` says, so it runs only with cores 1. Each cell's server first runs one unmeasured "
      "warm-up job of 10^6 numbers (the first writes into a fresh database file and WAL are slower), then the measured repeats. "
      "Peak RSS: server VmHWM; workers: sampled RSS sum of `squared worker` subprocesses.\n")
    a("| N | strategy | cores | submit→succeeded s | server wall s | store s | M numbers/s | server peak RSS MB | workers peak MB |")
    a("|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        a(f"| {human(c['n'])} | {c['strategy']} | {c['cores']} | {fmt_s(c['e2e'])} | {fmt_s(c['wall'])} | {fmt_s(c['store'])} | "
          f"{c['n'] / c['e2e']['median'] / 1e6:.1f} | {c['server_hwm_mb']:.0f} | {c['workers_peak_mb']:.0f} |")
    a("")

    a("### Result download (streamed, read and discarded)\n")
    a(f"The result of the {TARGET_LABEL} {max(cfg.cores_list)}-core job, whole, `GET /v1/jobs/{{id}}/result` read with http.client in 1 MiB reads; "
      "the count of squares is checked (lines for NDJSON, separators for JSON).\n")
    a("| N | format | time s | MB | MB/s | M numbers/s | client CPU s | server peak RSS MB |")
    a("|---|---|---|---|---|---|---|---|")
    for d in R["downloads"]:
        t = d["time"]["median"]
        a(f"| {human(d['n'])} | {d['format']} | {fmt_s(d['time'])} | {d['bytes'] / 1e6:.0f} | {d['bytes'] / 1e6 / t:.0f} | "
          f"{d['n'] / t / 1e6:.1f} | {d['client_cpu']:.2f} | {d['server_hwm_mb']:.0f} |")
    a("")

    # ---- seed
    a("## The seed note's patterns on the same numbers (same run)\n")
    a("`bench/seed.py`: the note's Python code without `print`/`sleep`, on `range(0, N)`, 2 processes where parallel, "
      "each result checked against the closed-form sum of squares. Times run from the call to the squares being a list in the parent. "
      f"`ratio` = seed time / squared {TARGET_LABEL} 2-core submit→succeeded (above 1: squared is faster).\n")
    a("| N | pattern | seed time s | squared s | ratio |")
    a("|---|---|---|---|---|")
    for s in R["seed"]:
        n = s["n"]
        sq = R["squared_at"].get(n)
        for name, p in s["patterns"].items():
            if "skipped" in p:
                a(f"| {human(n)} | {name} | skipped: {p['skipped']} | | |")
                continue
            st = {"median": p["median_s"], "min": p["min_s"], "max": p["max_s"], "n": len(p["runs_s"])}
            ratio = f"{p['median_s'] / sq['median']:.3g}×" if sq else "—"
            a(f"| {human(n)} | {name} | {fmt_s(st)} | {fmt_s(sq) if sq else '—'} | {ratio} |")
    a("")

    # ---- tiny
    a("## Tiny jobs (10 numbers each, SQLite)\n")
    a(f"{tiny_client_desc(cfg)}; each job `{{\"numbers\": [10 numbers], \"strategy\": S, \"cores\": {cfg.tiny_cores}}}`. "
      "Closed loop: every client submits its share as fast as it can, then long-polls each of its jobs until it ended; "
      "jobs/s = jobs / (first submit → last job seen ended), and the server-side figure is jobs / (first `created_at` → last `finished_at`). "
      "CPU columns are CPU-seconds per second of the phase (1.00 = one full core).\n")
    a("| strategy | jobs | succeeded | jobs/s (client) | jobs/s (server) | client CPU cores | server CPU cores | server peak RSS MB | workers peak MB |")
    a("|---|---|---|---|---|---|---|---|---|")
    for t in R["tiny"]:
        c = t["closed"]
        a(f"| {t['strategy']} | {c['jobs']:,} | {c['succeeded']:,} | {c['rate_client']:.0f} | {c['rate_server']:.0f} | "
          f"{c['client_cores']:.2f} | {c['server_cores']:.2f} | {c['server_hwm_mb']:.0f} | {c['workers_peak_mb']:.0f} |")
    a("")
    a("Open loop at half the closed-loop rate: job *i* is submitted at *t0 + i/rate* whatever earlier jobs do; latency runs from that "
      "scheduled instant (so client lag counts against it) to the long-poll answer showing the job ended; `from send` starts at the actual send.\n")
    a("| strategy | rate /s | jobs | achieved /s | p50 ms | p99 ms | max ms | p50 from send ms | p99 from send ms | p99 send lag ms | client CPU cores |")
    a("|---|---|---|---|---|---|---|---|---|---|---|")
    for t in R["tiny"]:
        o = t["open"]
        a(f"| {t['strategy']} | {o['target_rate']:.0f} | {o['jobs']:,} | {o['achieved_rate']:.0f} | {o['p50'] * 1e3:.2f} | {o['p99'] * 1e3:.2f} | "
          f"{o['max'] * 1e3:.1f} | {o['p50_sent'] * 1e3:.2f} | {o['p99_sent'] * 1e3:.2f} | {o['late_p99'] * 1e3:.2f} | {o['client_cores']:.2f} |")
    a("")
    bad = [(t["strategy"], m) for t in R["tiny"] for m in ("closed", "open") if t[m]["client_errors"] or t[m]["succeeded"] != t[m]["jobs"]]
    for s, m in bad:
        x = next(t for t in R["tiny"] if t["strategy"] == s)[m]
        a(f"- **{s} {m} loop: {x['jobs'] - x['succeeded']} jobs did not succeed, {x['client_errors']} client errors** {x['error_samples']}")
    if bad:
        a("")

    # ---- idle
    a("## Single-job latency at idle (SQLite)\n")
    a(f"One client on one keep-alive connection, one 10-number job at a time (`cores` {cfg.tiny_cores}), submit→long-poll answer `succeeded`, after 5 warm-up jobs.\n")
    a("| strategy | jobs | p50 ms | p99 ms | max ms |")
    a("|---|---|---|---|---|")
    for i in R["idle"]:
        a(f"| {i['strategy']} | {i['n']} | {i['p50'] * 1e3:.2f} | {i['p99'] * 1e3:.2f} | {i['max'] * 1e3:.2f} |")
    a("")

    # ---- scaling
    a("## Scaling\n")
    a("Time per number, threads on 2 cores (submit→succeeded / N), and the disk's floor: the same squares stored the way the lanes "
      "store them (one result file, two threads, `sync_file_range` per segment, one `fdatasync` each) with no server at all "
      "(`examples/disk_floor.rs`, same disk, run right after the big jobs):\n")
    a("| N | ns per number | server wall ns per number | vs smallest N | disk floor ns per number | floor vs smallest N |")
    a("|---|---|---|---|---|---|")
    floor = R["disk_floor"] if "skipped" not in R["disk_floor"] else {}
    base = floor_base = None
    for c in cells:
        if c["strategy"] == "threads" and c["cores"] == 2:
            per = c["e2e"]["median"] / c["n"] * 1e9
            base = base or per
            f = floor.get(c["n"])
            fper = f["median"] / c["n"] * 1e9 if f else None
            floor_base = floor_base or fper
            fcells = f"{fper:.2f} ({f['min'] / c['n'] * 1e9:.2f}–{f['max'] / c['n'] * 1e9:.2f}) | {fper / floor_base:.2f}×" if f else "– | –"
            a(f"| {human(c['n'])} | {per:.2f} | {c['wall']['median'] / c['n'] * 1e9:.2f} | {per / base:.2f}× | {fcells} |")
    a("")
    if "skipped" in R["disk_floor"]:
        a(f"Disk floor not measured: {R['disk_floor']['skipped']}.\n")
    a(f"CPU-bound job: {cfg.spin_numbers:,} numbers with `simulate.spin` = {cfg.spin:,}, cores 1 vs 2:\n")
    a("| strategy | 1 core s | 2 cores s | speedup |")
    a("|---|---|---|---|")
    for s in R["spin"]:
        a(f"| {s['strategy']} | {fmt_s(s[1])} | {fmt_s(s[2])} | {s['speedup']:.2f}× |")
    a("")

    # ---- memory
    a("## Memory (server peak RSS, VmHWM, per case)\n")
    a("| case | server peak MB | workers peak MB (sampled) |")
    a("|---|---|---|")
    for c in cells:
        if c["n"] >= 10**7:
            a(f"| {human(c['n'])} range job, {c['strategy']}, {cores_s(c['cores'])} | {c['server_hwm_mb']:.0f} | {c['workers_peak_mb']:.0f} |")
    for d in R["downloads"][1::2]:
        a(f"| {human(d['n'])} result downloads (JSON + NDJSON), after the jobs | {d['server_hwm_mb']:.0f} | |")
    for t in R["tiny"]:
        a(f"| {t['closed']['jobs']:,} tiny jobs, {t['strategy']} (closed loop) | {t['closed']['server_hwm_mb']:.0f} | {t['closed']['workers_peak_mb']:.0f} |")
    a("")

    # ---- postgres
    if R.get("postgres") is not None:
        pg = R["postgres"]
        a("## PostgreSQL\n")
        if "skipped" in pg:
            a(f"Skipped: {pg['skipped']}\n")
        else:
            a(f"Same cases against `--database {pg['url_redacted']}`.\n")
            a("| N | strategy | cores | submit→succeeded s | server wall s | server peak RSS MB |")
            a("|---|---|---|---|---|---|")
            for c in pg["big"]:
                a(f"| {human(c['n'])} | {c['strategy']} | {c['cores']} | {fmt_s(c['e2e'])} | {fmt_s(c['wall'])} | {c['server_hwm_mb']:.0f} |")
            a("")
            a("| tiny jobs | jobs/s (client) | open-loop rate /s | p50 ms | p99 ms | client CPU cores |")
            a("|---|---|---|---|---|---|")
            for t in pg["tiny"]:
                a(f"| {t['strategy']} | {t['closed']['rate_client']:.0f} | {t['open']['target_rate']:.0f} | {t['open']['p50'] * 1e3:.2f} | "
                  f"{t['open']['p99'] * 1e3:.2f} | {t['closed']['client_cores']:.2f} |")
            a("")
            a("| idle | p50 ms | p99 ms |")
            a("|---|---|---|")
            for i in pg["idle"]:
                a(f"| {i['strategy']} | {i['p50'] * 1e3:.2f} | {i['p99'] * 1e3:.2f} |")
            a("")

    a("## Notes\n")
    for note in R["notes"]:
        a(f"- {note}")
    a("")
    return "\n".join(L)


def targets(cfg, R):
    lines = []
    cells = R["big"]

    def cell(n, label, cores):
        return next((c for c in cells if c["n"] == n and c["strategy"] == label and c["cores"] == cores), None)

    seed_by_n = {s["n"]: s["patterns"] for s in R["seed"]}
    for n in (10**7, 10**6):
        c = cell(n, TARGET_LABEL, 2)
        sp = seed_by_n.get(n, {})
        ca, lc = sp.get("chunked_array", {}), sp.get("list_comprehension", {})
        if not c or "median_s" not in ca:
            lines.append(f"SKIP  {human(n)} range job vs seed: not measured")
            continue
        sq = c["e2e"]["median"]
        ratio = ca["median_s"] / sq
        lines.append(f"{verdict(ratio >= 20)}  {human(n)} range job, processes/shm, 2 cores: {ratio:.1f}× faster than seed chunked-array "
                     f"({sq:.3f} s vs {ca['median_s']:.3f} s; target ≥ 20×)")
        if n == 10**7 and "median_s" in lc:
            lines.append(f"{verdict(sq < lc['median_s'])}  {human(n)} range job, processes/shm, 2 cores: {lc['median_s'] / sq:.2f}× the list comprehension "
                         f"({sq:.3f} s vs {lc['median_s']:.3f} s; target: faster)")
    for t in R["tiny"]:
        need = 5000 if t["strategy"] == "threads" else 1500
        r = t["closed"]["rate_client"]
        ok = r >= need and t["closed"]["succeeded"] == t["closed"]["jobs"]
        lines.append(f"{verdict(ok)}  tiny jobs on SQLite, {t['strategy']}: {r:.0f} jobs/s (target ≥ {need:,}/s)"
                     + ("" if t["closed"]["succeeded"] == t["closed"]["jobs"] else f"; {t['closed']['jobs'] - t['closed']['succeeded']} did not succeed"))
    for t in R["tiny"]:
        p = t["open"]["p99"] * 1e3
        lines.append(f"{verdict(p <= 10)}  p99 submit→done at half load ({t['open']['target_rate']:.0f}/s), {t['strategy']}: {p:.2f} ms (target ≤ 10 ms)")
    for n, cap in ((10**7, 200), (10**8, 300)):
        cs = [c for c in cells if c["n"] == n]
        if not cs:
            lines.append(f"SKIP  server peak RSS during {human(n)} job: not measured" + (" (--quick)" if cfg.quick else ""))
            continue
        worst = max(cs, key=lambda c: c["server_hwm_mb"])
        lines.append(f"{verdict(worst['server_hwm_mb'] <= cap)}  server peak RSS during {human(n)} jobs: {worst['server_hwm_mb']:.0f} MB at worst "
                     f"({worst['strategy']}, {cores_s(worst['cores'])}; target ≤ {cap} MB)")
    per = {c["n"]: c["e2e"]["median"] / c["n"] for c in cells if c["strategy"] == "threads" and c["cores"] == 2}
    if 10**6 in per and len(per) > 1:
        devs = {n: per[n] / per[10**6] - 1 for n in per if n != 10**6}
        worst = max(devs.values(), key=abs)
        span = ", ".join(f"{human(n)} {d:+.0%}" for n, d in sorted(devs.items()))
        missing = "" if 10**8 in per else " — 10^8 not measured" + (" (--quick)" if cfg.quick else "")
        floor = R["disk_floor"] if "skipped" not in R["disk_floor"] else {}
        if 10**6 in floor and len(floor) > 1:
            fper = {n: floor[n]["median"] / n for n in floor}
            fspan = ", ".join(f"{human(n)} {fper[n] / fper[10**6] - 1:+.0%}" for n in sorted(fper) if n != 10**6)
            missing += f"; the disk floor alone, no server: {fspan}"
        lines.append(f"{verdict(abs(worst) <= 0.20)}  time per number (threads, 2 cores) vs 10^6: {span} (target within ±20%){missing}")
    return lines


# ---------------------------------------------------------------------------


class Config:
    def __init__(self, args):
        self.binary = os.path.realpath(args.squared)
        self.quick = args.quick
        self.sizes = [10**6, 10**7] if args.quick else [10**6, 10**7, 10**8]
        self.repeats = args.repeats or (2 if args.quick else 3)
        self.repeats_big = args.repeats_1e8 or self.repeats
        self.cores_list = [1, 2]
        self.seed_sizes = [10**6, 10**7]
        self.seed_small = args.seed_small or (1000 if args.quick else 5000)
        self.tiny_jobs = args.tiny_jobs or (3000 if args.quick else 10000)
        self.clients = 64
        self.client_procs = args.client_procs
        self.load_client = load_client(args)  # None: the Python client
        self.disk_floor = beside_squared(args, "disk_floor")  # None: not built
        self.client_threads = 1
        self.tiny_cores = 1
        self.open_seconds = 4.0 if args.quick else 10.0
        self.idle_jobs = args.idle_jobs or (50 if args.quick else 200)
        self.spin_numbers = 2000
        self.spin = 200000

    def repeats_for(self, n):
        return self.repeats_big if n >= 10**8 else self.repeats

    def dl_repeats_for(self, n):
        return 1 if n >= 10**8 else self.repeats


def load_client(args):
    """The tiny_load binary to use, or None for the Python client."""
    if args.load_client == "python":
        return None
    if args.load_client:
        return os.path.realpath(args.load_client)
    return beside_squared(args, "tiny_load")


def beside_squared(args, example):
    """The release build of `examples/EXAMPLE.rs` beside the --squared binary, or None."""
    beside = os.path.join(os.path.dirname(os.path.realpath(args.squared)), "examples", example)
    return beside if os.access(beside, os.X_OK) else None


def bench_disk_floor(cfg):
    """examples/disk_floor: the big jobs' squares stored as the lanes store
    them (result file, two threads, fdatasync), with no server: the part of
    the time per number that the disk alone sets. Same disk as the servers'
    databases (the temporary directory)."""
    if not cfg.disk_floor:
        return {"skipped": "examples/disk_floor is not built beside --squared (`cargo build --release --example disk_floor`)"}
    tmp = tempfile.mkdtemp(prefix="squared-floor-")
    try:
        cmd = [cfg.disk_floor, "--dir", tmp, "--repeats", str(cfg.repeats)]
        for n in cfg.sizes:
            cmd += ["--n", str(n)]
        log("disk floor: " + shlex.join(cmd))
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            return {"skipped": f"examples/disk_floor exited {run.returncode}: {run.stderr.strip()[-300:]}"}
        out = json.loads(run.stdout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {r["n"]: summary(r["seconds"]) for r in out["runs"]}


def main():
    ap = argparse.ArgumentParser(description="Benchmark squared against the seed note's Python patterns.")
    ap.add_argument("--squared", required=True, help="path to the squared release binary")
    ap.add_argument("--quick", action="store_true", help="smaller run (no 10^8 job, fewer repeats and jobs): a few minutes")
    ap.add_argument("--postgres", metavar="URL", help="also run the storage-touching cases with --database URL")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "BENCHMARKS.md"), help="Markdown report (default BENCHMARKS.md at the top of the repo)")
    ap.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    ap.add_argument("--repeats", type=int, help="repeats per case (default 3, --quick 2)")
    ap.add_argument("--repeats-1e8", type=int, help="repeats for 10^8 jobs (default: --repeats)")
    ap.add_argument("--tiny-jobs", type=int, help="tiny jobs in the closed-loop run (default 10000, --quick 3000)")
    ap.add_argument("--idle-jobs", type=int, help="jobs for idle latency (default 200, --quick 50)")
    ap.add_argument("--seed-small", type=int, help="N for the process-per-number seed pattern (default 5000, --quick 1000)")
    ap.add_argument("--load-client", metavar="PATH", help="tiny-jobs client: the tiny_load binary (`cargo build --release --example tiny_load`), or "
                    "`python` for the Python client (default: examples/tiny_load beside the --squared binary when it is there, else python)")
    ap.add_argument("--client-procs", type=int, default=4, help="Python tiny-jobs client only: client processes (64 connections split over them)")
    args = ap.parse_args()
    if not os.access(args.squared, os.X_OK):
        ap.error(f"{args.squared} is not an executable")
    if 64 % args.client_procs:
        ap.error("--client-procs must divide 64")
    if args.load_client not in (None, "python") and not os.access(args.load_client, os.X_OK):
        ap.error(f"--load-client {args.load_client} is not an executable (build it with `cargo build --release --example tiny_load`)")
    cfg = Config(args)
    log(f"tiny jobs client: {cfg.load_client or 'Python'}")
    started = time.time()
    load_before = os.getloadavg()
    commit, _ = git_commit(cfg.binary)
    R = {"notes": []}

    # The seed patterns run first, with no server up, so they have the machine.
    R["seed"] = []
    for n in cfg.seed_sizes:
        R["seed"].append(run_seed(n, 2, cfg.repeats))
    R["seed"].append(run_seed(cfg.seed_small, 2, cfg.repeats, ["process_per_number", "chunked_array", "chunked_queue", "pool_map", "list_comprehension"]))

    R["big"], R["downloads"] = bench_big_jobs(cfg)
    R["disk_floor"] = bench_disk_floor(cfg)
    # squared at the seed's small N, for the process-per-number comparison.
    srv = Server(cfg.binary)
    try:
        small = [run_big_job(srv, cfg.seed_small, dict(STRATEGIES[2][1]), 2)["e2e_s"] for _ in range(max(3, cfg.repeats))]
    finally:
        srv.stop()
    R["squared_at"] = {c["n"]: c["e2e"] for c in R["big"] if c["strategy"] == TARGET_LABEL and c["cores"] == 2}
    R["squared_at"][cfg.seed_small] = summary(small)

    R["tiny"] = bench_tiny(cfg)
    R["idle"] = bench_idle(cfg)
    R["spin"] = bench_spin(cfg)

    if args.postgres:
        R["postgres"] = bench_postgres(cfg, args.postgres)

    R["targets"] = targets(cfg, R)
    ncores = os.cpu_count() or 1
    for t in R["tiny"]:
        c = t["closed"]
        busy = c["client_cores"] + c["server_cores"]
        why = (
            "the client was not the bottleneck"
            if c["client_cores"] < 0.5 * max(c["server_cores"], 1e-9)
            else "the client took a large share of the CPU: treat this rate as a lower bound"
        )
        idle = f"; {ncores - busy:.2f} of {ncores} cores stayed idle, so the limit is not CPU" if busy < 0.8 * ncores else ""
        R["notes"].append(
            f"Tiny jobs, {t['strategy']}: the client used {c['client_cores']:.2f} cores and the server {c['server_cores']:.2f} "
            f"({c['client_cpu_s'] / max(c['jobs'], 1) * 1e6:.0f} µs of client CPU per job, submit and wait): {why}{idle}."
        )
    R["notes"] += [
        "The client runs on the same 2 cores as the server, so every client CPU-second is taken from the server; the CPU columns show how much.",
        "Seed patterns: `chunked_array` writes each square into a locked `multiprocessing.Array('q', N)` as the note does; the parent copies it out with one `result[:]` "
        "(the note's `list(result)` locks per element and is slower, so this favours the seed). `chunked_queue` drains the queue before `join()` "
        "(the note's join-then-drain order deadlocks at 10^6). `pool_map` uses chunksize N/(4·cores). The process-per-number pattern runs only at small N.",
        "squared's times include HTTP, durable storage of every square (on SQLite: rows in the database for jobs of up to 65,536 numbers, "
        "a result file synced with `fdatasync` before each chunk is marked done for bigger ones) and the long-poll; "
        "the seed's times end with the squares in memory.",
    ]
    env = {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "duration_s": time.time() - started,
        "command": "python3 bench/run.py " + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "load": (load_before, os.getloadavg()),
        "commit": commit,
        "binary": cfg.binary,
        "tiny_client": cfg.load_client or "python",
    }
    report = build_report(cfg, env, R)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": R}, f, indent=1, default=str)
    print("\n".join(R["targets"]))
    log(f"wrote {args.out} in {env['duration_s'] / 60:.1f} min")


def redact(url):
    p = urllib.parse.urlsplit(url)
    if p.password:
        netloc = p.netloc.replace(":" + p.password + "@", ":***@")
        return urllib.parse.urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment))
    return url


def bench_postgres(cfg, url):
    log(f"postgres: trying {redact(url)}")
    try:
        srv = Server(cfg.binary, database=url)
        conn = srv.conn()
        st, body = conn.request("GET", "/readyz")
        conn.close()
        srv.stop()
        if st != 200:
            return {"skipped": f"server started but /readyz answered {st}: {body[:200]!r}"}
    except ServerFailed as e:
        msg = f"the server does not accept `--database {redact(url)}`: {str(e).replace(url, redact(url))[-400:]}"
        log("postgres: " + msg)
        return {"skipped": msg}
    out = {"url_redacted": redact(url)}
    out["big"], _ = bench_big_jobs(cfg, database=url, tag="postgres")
    out["tiny"] = bench_tiny(cfg, database=url, tag="postgres")
    out["idle"] = bench_idle(cfg, database=url, tag="postgres")
    return out


if __name__ == "__main__":
    main()
