#!/usr/bin/env python3
"""Upstream fault drill with keep-alive clients: what a client sees through the gateway while
its upstream is killed, hung and restarted.

Starts `tollgate-bench-upstream` on a fixed loopback port and tollgate in front of it, then
runs CLIENTS keep-alive clients for SECONDS, each alternating `GET /x` and `POST /x` with a
BODY-byte body on one connection, while the upstream goes through a fault cycle every 6 s:
killed (SIGKILL; connects are refused), started again, hung (SIGSTOP; requests time out),
resumed (SIGCONT), and stopped gracefully and restarted. A client reconnects after an
answer that said `Connection: close` (not an error) and after a connection error (counted).

A connection error is anything that is not a whole response on a request the client sent:
a reset, a broken pipe, or an end of stream before or inside a response. The goal is 0, as
nginx: every request gets an answer (200, or a 502/503/504 envelope).

With --rolling, the upstream has TARGETS targets (one process each) and goes through a rolling
restart instead: each target in turn is killed, left down 2 s, started again, 1 s apart, for
as long as the run lasts; the clients send GETs only, and every answer but a 200 counts as a
client-visible error too (the goal is 0: a GET that meets a dead target is retried on another).

Usage: benches/load/fault_drill.py --tollgate target/release/tollgate \\
           --upstream target/release/tollgate-bench-upstream [--seconds 20] [--clients 16] \\
           [--body 65536] [--rolling --targets 3]
Everything listens on 127.0.0.1; every child is killed on exit; the run is bounded by
--seconds. Prints a summary and exits 1 if any connection error was seen.
"""

import argparse
import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(port, admin, upstreams):
    targets = ", ".join(f'"http://127.0.0.1:{u}"' for u in upstreams)
    return f"""
[server]
listen = "127.0.0.1:{port}"
[admin]
listen = "127.0.0.1:{admin}"
[[upstreams]]
name = "app"
targets = [{targets}]
connect_timeout = "500ms"
timeout = "1s"
retry_after = "1s"
[[routes]]
prefix = "/"
upstream = "app"
auth = false
"""


async def read_response(reader):
    """One response: (status, headers dict). Raises on an end of stream before its end."""
    line = await reader.readline()
    if not line:
        raise ConnectionError("end of stream before a response")
    status = int(line.split()[1])
    headers = {}
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("end of stream inside a response head")
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    if length:
        await reader.readexactly(length)
    return status, headers


async def client(port, body, end, tally, get_only=False):
    get = b"GET /x HTTP/1.1\r\nHost: drill\r\n\r\n"
    post = (
        b"POST /x HTTP/1.1\r\nHost: drill\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body
    writer = None
    turn = 0
    while time.monotonic() < end:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as e:
                tally["connect_errors"] += 1
                tally["error: connect " + type(e).__name__] += 1
                await asyncio.sleep(0.05)
                continue
        request = post if turn % 2 and not get_only else get
        turn += 1
        send = None
        try:
            writer.write(request)
            send = asyncio.ensure_future(writer.drain())
            status, headers = await asyncio.wait_for(read_response(reader), 10)
            await asyncio.wait_for(send, 10)
            tally[f"status {status}"] += 1
            tally["answered"] += 1
            if get_only and status != 200:
                tally["non_200"] += 1
            if headers.get("connection", "").lower() == "close":
                tally["closed_by_answer"] += 1
                writer.close()
                writer = None
        except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            tally["connection_errors"] += 1
            tally["error: " + type(e).__name__] += 1
            if send is not None:
                send.cancel() if not send.done() else send.exception()
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


def start_upstream(binary, port):
    return subprocess.Popen(
        [binary, f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


async def faults(upstream_binary, port, procs, end, events):
    """Every 6 s: kill, restart, hang, resume, graceful stop, restart."""
    up = procs["upstream"]
    t0 = time.monotonic()
    while time.monotonic() + 6 < end:
        await asyncio.sleep(1)
        up.kill()
        up.wait()
        events.append(f"{time.monotonic() - t0:5.1f}s upstream killed")
        await asyncio.sleep(1)
        up = procs["upstream"] = start_upstream(upstream_binary, port)
        events.append(f"{time.monotonic() - t0:5.1f}s upstream started")
        await asyncio.sleep(1)
        up.send_signal(signal.SIGSTOP)
        events.append(f"{time.monotonic() - t0:5.1f}s upstream hung (SIGSTOP)")
        await asyncio.sleep(1.5)
        up.send_signal(signal.SIGCONT)
        events.append(f"{time.monotonic() - t0:5.1f}s upstream resumed")
        await asyncio.sleep(0.5)
        up.terminate()
        up.wait()
        events.append(f"{time.monotonic() - t0:5.1f}s upstream stopped (SIGTERM)")
        await asyncio.sleep(1)
        up = procs["upstream"] = start_upstream(upstream_binary, port)
        events.append(f"{time.monotonic() - t0:5.1f}s upstream started")


async def rolling(upstream_binary, ports, procs, end, events):
    """Each target in turn: killed, down 2 s, started again; 1 s between targets."""
    t0 = time.monotonic()
    while time.monotonic() + 3 < end:
        for i, port in enumerate(ports):
            if time.monotonic() + 3 >= end:
                break
            await asyncio.sleep(1)
            procs[f"upstream{i}"].kill()
            procs[f"upstream{i}"].wait()
            events.append(f"{time.monotonic() - t0:5.1f}s target {i} killed")
            await asyncio.sleep(2)
            procs[f"upstream{i}"] = start_upstream(upstream_binary, port)
            events.append(f"{time.monotonic() - t0:5.1f}s target {i} started")


async def ready(port):
    for _ in range(100):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tollgate", required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--body", type=int, default=64 * 1024)
    ap.add_argument("--rolling", action="store_true")
    ap.add_argument("--targets", type=int, default=1)
    args = ap.parse_args()

    up_ports = [free_port() for _ in range(args.targets)]
    up_port, gw_port, admin_port = up_ports[0], free_port(), free_port()
    procs = {}
    work = tempfile.mkdtemp(prefix="tollgate-drill.")
    try:
        for i, port in enumerate(up_ports):
            procs["upstream" if i == 0 and not args.rolling else f"upstream{i}"] = start_upstream(args.upstream, port)
        path = os.path.join(work, "drill.toml")
        with open(path, "w") as f:
            f.write(config(gw_port, admin_port, up_ports))
        procs["tollgate"] = subprocess.Popen(
            [args.tollgate, "--config", path, "--log-format", "json"],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(work, "tollgate.log"), "w"),
            env={**os.environ, "RUST_LOG": "error"},
        )
        for port in up_ports:
            await ready(port)
        await ready(gw_port)
        tally = collections.Counter()
        events = []
        end = time.monotonic() + args.seconds
        body = b"x" * args.body
        drill = (
            rolling(args.upstream, up_ports, procs, end, events)
            if args.rolling
            else faults(args.upstream, up_port, procs, end, events)
        )
        await asyncio.gather(
            drill,
            *(client(gw_port, body, end, tally, args.rolling) for _ in range(args.clients)),
        )
        alive = procs["tollgate"].poll() is None
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()

    if args.rolling:
        print(f"rolling restart: {args.targets} targets, {args.clients} keep-alive clients "
              f"sending GETs, {args.seconds:.0f} s")
    else:
        print(f"fault drill: {args.clients} keep-alive clients, GET and POST ({args.body} B) "
              f"alternating, {args.seconds:.0f} s")
    for e in events:
        print("  " + e)
    for key in sorted(tally):
        print(f"  {key:32} {tally[key]}")
    print(f"  {'tollgate alive at the end':32} {alive}")
    errors = tally["connection_errors"] + tally["connect_errors"]
    print(f"connection errors: {errors}")
    if args.rolling:
        errors += tally["non_200"]
        print(f"client-visible errors (connection errors and answers other than 200): {errors}")
    sys.exit(0 if errors == 0 and alive else 1)


if __name__ == "__main__":
    asyncio.run(main())
