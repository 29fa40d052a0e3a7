"""The load generator of benchmarks/runtime (moved out of bench.py unchanged in method).

Closed loop (each connection sends its next request when the previous answer is in), HTTP/1.1 keep-alive
over raw sockets, one outstanding request per connection, every request timed with perf_counter_ns from
just before ``sendall`` to the last byte of the response; no coordinated-omission correction, no synthetic
samples. Separate processes (1 for c < 4, else 2, each driving its share of the connections from a
selector loop), bounded by time and request count, loopback only. With ``pin`` the generator runs on CPU 0.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import selectors
import socket
import statistics
import time


def request(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Conn:
    __slots__ = ("buf", "need", "sock", "start", "status")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.need = -1  # total bytes of the response once headers are parsed
        self.start = 0
        self.status = 0

    def feed(self, data: bytes) -> bool:
        """True when a whole response is in (Content-Length or chunked: some peers stream their answer)."""
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = self.buf[:end].decode("latin-1").split("\r\n")
            self.status = int(head[0].split(" ", 2)[1])
            length = 0
            chunked = False
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            self.need = -(end + 4) - 2 if chunked else end + 4 + length  # <= -2: chunked, body from -need-2
        if self.need <= -2:
            total = chunked_end(self.buf, -self.need - 2)
            if total < 0:
                return False
            self.buf = self.buf[total:]
            self.need = -1
            return True
        if len(self.buf) >= self.need:
            self.buf = self.buf[self.need :]
            self.need = -1
            return True
        return False


def chunked_end(buf: bytes, pos: int) -> int:
    """Offset just past a chunked body that starts at ``pos`` in ``buf``, or -1 while it is incomplete."""
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return -1
        size = int(buf[pos:eol].split(b";", 1)[0], 16)
        if size == 0:
            trailer = buf.find(b"\r\n\r\n", eol)  # no trailers: the last chunk is "0\r\n\r\n"
            return -1 if trailer < 0 else trailer + 4
        pos = eol + 2 + size + 2
        if pos > len(buf):
            return -1


def _worker(host, port, payload, conns, warmup, duration, max_requests, cpu, ready, go, results) -> None:
    try:
        _run(host, port, payload, conns, warmup, duration, max_requests, cpu, ready, go, results)
    except Exception as exc:  # reported by drive(): a peer that resets or stalls must not hang the run
        ready.release()
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def _run(host, port, payload, conns, warmup, duration, max_requests, cpu, ready, go, results) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    sel = selectors.DefaultSelector()
    pool = []
    for _ in range(conns):
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn = _Conn(sock)
        pool.append(conn)
        sel.register(sock, selectors.EVENT_READ, conn)
    ready.release()
    go.wait()
    clock = time.perf_counter_ns
    t_begin = clock()
    t_measure = t_begin + int(warmup * 1e9)
    t_end = t_measure + int(duration * 1e9)
    lat: list[int] = []
    errors = 0
    sent = 0
    for conn in pool:
        conn.start = clock()
        conn.sock.sendall(payload)
        sent += 1
    open_conns = len(pool)
    while open_conns:
        events = sel.select(timeout=5.0)
        if not events and clock() > t_end + 30e9:
            raise TimeoutError(f"{open_conns} connection(s) got no answer 30 s past the end of the run")
        for key, _ in events:
            conn = key.data
            try:
                data = conn.sock.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                raise ConnectionError("server closed the connection")
            if not conn.feed(data):
                continue
            now = clock()
            if conn.start >= t_measure:
                lat.append(now - conn.start)
                if conn.status != 200:
                    errors += 1
            if now >= t_end or len(lat) >= max_requests:
                sel.unregister(conn.sock)
                conn.sock.close()
                open_conns -= 1
                continue
            conn.start = clock()
            conn.sock.sendall(payload)
            sent += 1
    window = (min(clock(), t_end) - t_measure) / 1e9
    results.put({"lat": lat, "errors": errors, "window": window})


def drive(host, port, payload, concurrency, warmup, duration, pin, max_requests=2_000_000, cpus=None) -> dict:
    """``cpus``: run one generator process per CPU listed (at most one per 8 connections), each pinned to its CPU,
    instead of 1-2 processes on CPU 0 (``pin``) or unpinned."""
    ctx = mp.get_context("spawn")
    if cpus:
        procs_n = max(1, min(len(cpus), concurrency // 8 or 1))
        cpu_of = list(cpus[:procs_n])
    else:
        procs_n = 1 if concurrency < 4 else 2
        cpu_of = [0 if pin else None] * procs_n
    per = [concurrency // procs_n + (1 if i < concurrency % procs_n else 0) for i in range(procs_n)]
    ready = ctx.Semaphore(0)
    go = ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(
                host,
                port,
                payload,
                n,
                warmup,
                duration,
                max_requests // procs_n,
                cpu_of[i],
                ready,
                go,
                results,
            ),
        )
        for i, n in enumerate(per)
    ]
    return gather(procs, ready, go, results, warmup + duration, concurrency, "load generator")


def gather(procs, ready, go, results, seconds: float, concurrency: int, what: str) -> dict:
    """Start the load processes, release them together once all have connected, merge what they measured."""
    for p in procs:
        p.start()
    for _ in procs:
        if not ready.acquire(timeout=60):
            raise RuntimeError(f"{what} could not connect within 60 s")
    go.set()
    try:
        out = [results.get(timeout=seconds + 60) for _ in procs]
    except queue.Empty:
        raise RuntimeError(f"{what} got no result in time") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    failed = [r["error"] for r in out if "error" in r]
    if failed:
        raise RuntimeError(failed[0])
    return {
        "lat": [x for r in out for x in r["lat"]],
        "window": max(r["window"] for r in out),
        "errors": sum(r["errors"] for r in out),
        "concurrency": concurrency,
    }


def summarize(samples: list[dict]) -> dict:
    """Merge the rounds of one (server, concurrency): percentiles over all samples, rate over all windows."""
    lat = sorted(x for s in samples for x in s["lat"])
    if not lat:
        raise RuntimeError("no request completed")

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6

    return {
        "loadavg_1m": os.getloadavg()[0],  # other work on the machine during the run
        "concurrency": samples[0]["concurrency"],
        "rounds": len(samples),
        "requests": len(lat),
        "errors": sum(s["errors"] for s in samples),
        "rps": len(lat) / sum(s["window"] for s in samples),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
        "mean_ms": statistics.fmean(lat) / 1e6,
        "round_p50_ms": [sorted(s["lat"])[len(s["lat"]) // 2] / 1e6 for s in samples if s["lat"]],
    }
