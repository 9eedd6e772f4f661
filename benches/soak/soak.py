#!/usr/bin/env python3
"""The soak of benches/soak.sh: a bounded mixed-load run against the release binary.

Starts the fault upstream (`tollgate-bench-upstream --faults`) and tollgate, drives them for
SECONDS with a paced mix of request classes (CLASSES) over keep-alive connections, reloads
tollgate (SIGHUP, alternating between two configs) every 10 s, plus a warm-up pair at 1 s and
2 s, then checks and prints:

- no crash: tollgate alive at every sample, and exit 0 on SIGTERM;
- RSS: the last sample under load within 10% of where it settled (the sample at 20% of the run);
- file descriptors: back to the baseline (taken before any load) once load stops and the
  upstream closes its idle keep-alive connections;
- every request answered, at the client: each request got an HTTP response with an allowed
  status, its own X-Request-Id back and, for errors, a JSON envelope carrying that id (no
  connection error, no timeout);
- every request answered, at the upstream: the request ids the upstream recorded are exactly
  the ids of the requests whose answer says they were proxied (once each; a connect-failure
  retry by tollgate never reaches the upstream, so a duplicate would be a bug);
- tollgate's own request counter equals the client's count, and every reload was applied.

Python standard library only. Keys come from `tollgate gen-key` into the work dir and are
never printed. Exit status 0 when every check passes, 1 otherwise.
"""

import argparse
import asyncio
import collections
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

RELOAD_EVERY = float(os.environ.get("SOAK_RELOAD_EVERY", 10))  # seconds between SIGHUPs (0: none)
RATE_SCALE = float(os.environ.get("SOAK_RATE_SCALE", 1))  # multiplies every class's req/s
SETTLE_FRACTION = 0.2  # RSS "settled" = the sample at this fraction of the run
RSS_TOLERANCE = 0.10
REQUEST_TIMEOUT = 10.0  # a request unanswered this long is a client timeout (a failure)
FD_WAIT = 20.0  # how long fds may take to return to the baseline after load
UPSTREAM_TIMEOUT_MS = 1000  # the main upstream's `timeout` in the soak configs
SLOW_MS = 200  # "slow" answers: well within the timeout
HANG_MS = 2000  # "timeout" answers: past it (504)

ENVELOPE_CODE = {
    401: "authentication_error",
    429: "rate_limited",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


# ---- request classes ---------------------------------------------------------------------
# name: (req/s, connections, method, path, key, max body bytes or None,
#        {allowed status: whether a request answered so has reached the upstream})
CLASSES = {
    "valid": (200, 8, "GET", "/v1/ok", "valid", None, {200: True}),
    "valid-post": (20, 2, "POST", "/v1/echo", "valid-bearer", 65536, {200: True}),
    "slow": (20, 6, "GET", "/v1/delay?ms=%d" % SLOW_MS, "valid", None, {200: True}),
    "invalid-key": (40, 2, "GET", "/v1/ok", "invalid", None, {401: False}),
    "over-limit": (40, 2, "GET", "/v1/ok", "limited", None, {200: True, 429: False}),
    "rotated-key": (10, 1, "GET", "/v1/ok", "rotated", None, {200: True, 401: False}),
    "upstream-timeout": (4, 6, "GET", "/v1/delay?ms=%d" % HANG_MS, "valid", None, {504: True}),
    "upstream-503": (10, 1, "GET", "/v1/unavailable", "valid", None, {503: True}),
    "upstream-reset": (10, 1, "GET", "/reset/x", "valid", None, {502: True}),
    "upstream-refused": (10, 1, "GET", "/refused/x", "valid", None, {502: False}),
    "upstream-flapping": (20, 2, "GET", "/flap/x", "valid", None, {200: True, 502: False}),
}
# Which upstream listener a proxied request of each class must arrive at.
LISTENER = {"upstream-reset": "reset", "upstream-flapping": "flap"}

CLASS_NOTES = {
    "valid": "GET, X-API-Key, enterprise key",
    "valid-post": "POST 0-64 KiB body, Bearer, echoed length",
    "slow": "upstream answers after %d ms" % SLOW_MS,
    "invalid-key": "unknown key or none: 401",
    "over-limit": "plan of 120/60 per min, burst 5: mostly 429",
    "rotated-key": "key only in config B: 200 or 401",
    "upstream-timeout": "upstream silent %d ms > timeout %d ms: 504" % (HANG_MS, UPSTREAM_TIMEOUT_MS),
    "upstream-503": "upstream 503 with an HTML page: envelope",
    "upstream-reset": "upstream reads the head, sends RST: 502",
    "upstream-refused": "nothing listens: 502 (GET retried once)",
    "upstream-flapping": "listener up 1 s / down 1 s, Connection: close",
}


def log(msg):
    print("== soak: " + msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gen_key(tollgate, work):
    """A new key from `tollgate gen-key`: (plaintext, digest). Never printed."""
    out = subprocess.run(
        [tollgate, "gen-key", "--prefix", "tg_soak_"], cwd=work, check=True, capture_output=True, text=True
    ).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return fields["key"].strip(), fields["hash"].strip()


def config_text(variant, ports, digests):
    """The two configs the soak alternates between. B differs from A in: the limited plan's
    rate (120 -> 60 per minute), the rate-limit headers (x-ratelimit -> both), the main
    upstream's connect_timeout (1s -> 2s: a new connection pool on every reload) and one
    extra key."""
    b = variant == "B"
    keys = [("soak-valid", digests["valid"], "enterprise", "requests_per_minute = 60000000\n"),
            ("soak-limited", digests["limited"], "limited", "")]
    if b:
        keys.append(("soak-rotated", digests["rotated"], "enterprise", "requests_per_minute = 60000000\n"))
    text = f"""# benches/soak.sh config {variant} (generated; the soak alternates A and B on SIGHUP)
[server]
listen = "127.0.0.1:{ports['gateway']}"
shutdown_grace = "5s"

[admin]
listen = "127.0.0.1:{ports['admin']}"

[limits]
headers = "{'both' if b else 'x-ratelimit'}"

# Per-IP guards off in effect: every class comes from 127.0.0.1, and the soak checks the
# per-key limiter, not the IP block.
[limits.ip_throttle]
rejections = 2000000000
window = "1s"
block_for = "1s"

[limits.failed_auth]
attempts = 2000000000
window = "1s"
block_for = "1s"

[plans.limited]
requests_per_minute = {60 if b else 120}
burst = 5

[[upstreams]]
name = "main"
url = "http://{ports['main']}"
connect_timeout = "{'2s' if b else '1s'}"
timeout = "{UPSTREAM_TIMEOUT_MS}ms"

[[upstreams]]
name = "reset"
url = "http://{ports['reset']}"
timeout = "{UPSTREAM_TIMEOUT_MS}ms"

[[upstreams]]
name = "flap"
url = "http://{ports['flap']}"
connect_timeout = "1s"
timeout = "{UPSTREAM_TIMEOUT_MS}ms"

[[upstreams]]
name = "refused"
url = "http://127.0.0.1:{ports['refused']}"
connect_timeout = "1s"

[[routes]]
prefix = "/v1/"
upstream = "main"

[[routes]]
prefix = "/reset/"
upstream = "reset"

[[routes]]
prefix = "/flap/"
upstream = "flap"

[[routes]]
prefix = "/refused/"
upstream = "refused"
"""
    for key_id, digest, plan, extra in keys:
        text += f'\n[[keys]]\nid = "{key_id}"\nkey = "{digest}"\nplan = "{plan}"\n{extra}'
    return text


def reload_times(seconds):
    """When to SIGHUP, in seconds from the start of the load: every RELOAD_EVERY seconds, and
    a warm-up pair (to B and back to A) at 1 s and 2 s, so that both configs and the pool
    replacement have been through the process before RSS is taken as settled, however short
    the run."""
    if RELOAD_EVERY <= 0:
        return []
    times = {1.0, 2.0}
    k = 1
    while k * RELOAD_EVERY < seconds:
        times.add(k * RELOAD_EVERY)
        k += 1
    return sorted(t for t in times if t < seconds)


def write_pids(procs, pids_file):
    """Lists the children still running, for soak.sh to kill if this process is killed."""
    write_atomically(pids_file, "".join(f"{p.pid}\n" for p in procs.values() if p.poll() is None))


def write_atomically(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---- /proc -----------------------------------------------------------------------------------
# A process that has exited reads as 0 / empty: the "alive" check reports it.
def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def fd_targets(pid):
    """What the descriptors are, counted by kind (`socket:`, `anon_inode:[eventpoll]`, ...)."""
    out = collections.Counter()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {}
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        out[re.sub(r"\[\d+\]", "", target)] += 1
    return dict(out)


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- a minimal HTTP/1.1 client ---------------------------------------------------------------
class Answer:
    __slots__ = ("status", "headers", "body", "keep_alive")


async def read_answer(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            name = name.strip().lower()
            headers[name] = (headers[name] + ", " if name in headers else "") + value.strip()
    keep_alive = "close" not in headers.get("connection", "").lower()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        body = bytes(body)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif status in (204, 304):
        body = b""
    else:
        body = await reader.read()
        keep_alive = False
    answer = Answer()
    answer.status, answer.headers, answer.body, answer.keep_alive = status, headers, body, keep_alive
    return answer


class Tally:
    def __init__(self):
        self.sent = collections.Counter()  # class -> requests
        self.status = collections.defaultdict(collections.Counter)  # class -> status -> n
        self.failures = collections.defaultdict(collections.Counter)  # class -> kind -> n
        self.examples = []  # the first failures, described
        self.expected = {}  # request id -> class, for every request the upstream must have seen
        self.limit_values = collections.Counter()  # X-RateLimit-Limit of the limited key
        self.ietf_headers = 0  # answers that carried RateLimit-Policy (config B)
        self.latency = collections.defaultdict(list)

    def fail(self, cls, kind, detail):
        self.failures[cls][kind] += 1
        if len(self.examples) < 12:
            self.examples.append(f"{cls}: {kind}: {detail}")


def check_answer(tally, cls, rid, answer, sent_body):
    """Checks one answer; returns a failure kind or None."""
    allowed = CLASSES[cls][6]
    if answer.headers.get("x-request-id") != rid:
        return "request_id_header", f"{rid} answered with X-Request-Id {answer.headers.get('x-request-id')!r}"
    if answer.status not in allowed:
        return "unexpected_status", f"{rid}: {answer.status} {answer.body[:200]!r}"
    if answer.status >= 400:
        if not answer.headers.get("content-type", "").startswith("application/json"):
            return "bad_envelope", f"{rid}: content-type {answer.headers.get('content-type')!r}"
        try:
            env = json.loads(answer.body)
        except ValueError:
            return "bad_envelope", f"{rid}: not JSON: {answer.body[:200]!r}"
        if (
            env.get("success") is not False
            or env.get("request_id") != rid
            or env.get("error", {}).get("code") != ENVELOPE_CODE[answer.status]
        ):
            return "bad_envelope", f"{rid}: {answer.body[:300]!r}"
        if b"internal.example" in answer.body:
            return "bad_envelope", f"{rid}: upstream page leaked: {answer.body[:200]!r}"
    elif cls == "valid-post":
        if answer.body != str(len(sent_body)).encode():
            return "bad_body", f"{rid}: sent {len(sent_body)} bytes, upstream got {answer.body[:40]!r}"
    elif answer.body != b"ok":
        return "bad_body", f"{rid}: {answer.body[:80]!r}"
    if cls == "over-limit" and "x-ratelimit-limit" in answer.headers:
        tally.limit_values[answer.headers["x-ratelimit-limit"]] += 1
    if "ratelimit-policy" in answer.headers:
        tally.ietf_headers += 1
    return None


async def worker(cls, index, port, keys, end, tally, counter):
    rate, conns, method, path, key_kind, max_body, allowed = CLASSES[cls]
    interval = conns / (rate * RATE_SCALE)
    rng = random.Random(f"{cls}-{index}")
    reader = writer = None
    next_at = time.monotonic() + rng.random() * interval
    while True:
        now = time.monotonic()
        if next_at >= end:
            break
        if next_at > now:
            await asyncio.sleep(next_at - now)
        # Behind (slow answers): go on from now rather than bursting to catch up.
        next_at = max(next_at + interval, time.monotonic())
        counter[0] += 1
        rid = f"soak.{cls}.{counter[0]}"
        headers = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"X-Request-Id: {rid}"]
        if key_kind == "invalid":
            if counter[0] % 2:
                headers.append(f"X-API-Key: {keys['invalid']}")
        elif key_kind == "valid-bearer":
            headers.append(f"Authorization: Bearer {keys['valid']}")
        else:
            headers.append(f"X-API-Key: {keys[key_kind]}")
        body = b""
        if max_body is not None:
            body = rng.randbytes(rng.randrange(0, max_body + 1))
            headers.append(f"Content-Length: {len(body)}")
        request = ("\r\n".join(headers) + "\r\n\r\n").encode() + body
        tally.sent[cls] += 1
        started = time.monotonic()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            answer = await asyncio.wait_for(read_answer(reader), REQUEST_TIMEOUT)
        except asyncio.TimeoutError:
            tally.fail(cls, "client_timeout", f"{rid}: no answer in {REQUEST_TIMEOUT:.0f} s")
            writer.close()
            reader = writer = None
            continue
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as e:
            tally.fail(cls, "connection_error", f"{rid}: {type(e).__name__}: {e}")
            if writer is not None:
                writer.close()
            reader = writer = None
            continue
        tally.latency[cls].append(time.monotonic() - started)
        tally.status[cls][answer.status] += 1
        failure = check_answer(tally, cls, rid, answer, body)
        if failure:
            tally.fail(cls, *failure)
        if allowed.get(answer.status):
            tally.expected[rid] = cls
        if not answer.keep_alive:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def http_get(port, path, method="GET"):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".encode())
        return await asyncio.wait_for(read_answer(reader), 30)
    finally:
        writer.close()


async def try_get(port, path, method="GET"):
    """http_get, or None when nothing answers (a dead process is reported by the checks)."""
    try:
        return await http_get(port, path, method)
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError):
        return None


async def ready(gateway, admin_port):
    """Waits up to 10 s for /readyz to answer 200; False if tollgate exits or never does."""
    for _ in range(100):
        if gateway.poll() is not None:
            return False
        answer = await try_get(admin_port, "/readyz")
        if answer and answer.status == 200:
            return True
        await asyncio.sleep(0.1)
    return False


def tail(path, n):
    with open(path, errors="replace") as f:
        return " | ".join(line.rstrip()[:300] for line in f.readlines()[-n:])


# ---- the run -------------------------------------------------------------------------------
async def soak(args, procs, pids_file):
    work = args.work
    keys, digests = {}, {}
    for kind in ("valid", "limited", "rotated", "invalid"):
        keys[kind], digests[kind] = gen_key(args.tollgate, work)
    with open(os.path.join(work, "keys.json"), "w", opener=lambda p, f: os.open(p, f, 0o600)) as f:
        json.dump(keys, f)

    upstream = subprocess.Popen(
        [args.upstream, "--faults", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=open(os.path.join(work, "upstream.log"), "w"), text=True
    )
    procs["upstream"] = upstream
    write_pids(procs, pids_file)
    listening = dict(kv.split("=", 1) for kv in upstream.stdout.readline().split())
    # Bound, never listening, held for the whole run: connecting is refused, and no other
    # process can start listening there meanwhile.
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    ports = {
        "main": listening["main"],
        "reset": listening["reset"],
        "flap": listening["flap"],
        "refused": refused.getsockname()[1],
    }
    config_path = os.path.join(work, "tollgate.toml")
    gateway_log = os.path.join(work, "tollgate.log")
    # The gateway's ports are picked free, then bound by tollgate: another process may take
    # one in between, so a start that fails is tried again on new ports.
    for attempt in range(3):
        ports["gateway"], ports["admin"] = free_port(), free_port()
        configs = {v: config_text(v, ports, digests) for v in "AB"}
        for v in "BA":  # A last: it is the one tollgate starts with
            write_atomically(config_path, configs[v])
            subprocess.run([args.tollgate, "check", "--config", config_path], check=True, capture_output=True)
        gateway = subprocess.Popen(
            [args.tollgate, "--config", config_path, "--log-format", "json", "--log-level", "info,tollgate::access=off"],
            cwd=work, stdout=subprocess.DEVNULL, stderr=open(gateway_log, "w"),
        )
        procs["tollgate"] = gateway
        write_pids(procs, pids_file)
        if await ready(gateway, ports["admin"]):
            break
        gateway.kill()
        gateway.wait()
        log(f"tollgate did not start (attempt {attempt + 1}); its log ends: {tail(gateway_log, 3)}")
    else:
        raise SystemExit("tollgate did not start; see the log above")
    pid = gateway.pid
    # reload_on_sighup is spawned before the listeners; after a second its handler is surely
    # installed. Then the baseline: listeners, the runtime's own descriptors, no connection.
    await asyncio.sleep(1.0)
    fd_baseline = fd_count(pid)
    fd_baseline_targets = fd_targets(pid)

    tally = Tally()
    counter = [0]
    samples = []  # (seconds since start, rss KiB, fds)
    alive = {"tollgate": True, "upstream": True}
    reloads = {"sent": 0}
    cpu0 = {"tollgate": cpu_seconds(pid), "upstream": cpu_seconds(upstream.pid), "client": sum(os.times()[:2])}
    start = time.monotonic()
    end = start + args.seconds
    log(f"load for {args.seconds} s: {sum(c[0] for c in CLASSES.values()) * RATE_SCALE:.0f} req/s over {sum(c[1] for c in CLASSES.values())} connections, "
        f"SIGHUP at 1 s, 2 s, then every {RELOAD_EVERY:g} s")

    async def sampler():
        while time.monotonic() < end:
            t = time.monotonic() - start
            if gateway.poll() is not None:
                alive["tollgate"] = False
                return
            if upstream.poll() is not None:
                alive["upstream"] = False
            samples.append((t, rss_kib(pid), fd_count(pid)))
            await asyncio.sleep(1.0 - (time.monotonic() - start) % 1.0)

    async def reloader():
        variant = "A"
        for at in reload_times(args.seconds):
            await asyncio.sleep(start + at - time.monotonic())
            variant = "B" if variant == "A" else "A"
            write_atomically(config_path, configs[variant])
            if gateway.poll() is None:
                os.kill(pid, signal.SIGHUP)
                reloads["sent"] += 1

    tasks = [worker(cls, i, ports["gateway"], keys, end, tally, counter) for cls, c in CLASSES.items() for i in range(c[1])]
    await asyncio.gather(sampler(), reloader(), *tasks)
    load_secs = time.monotonic() - start
    # Every client connection is closed now.
    cpu1 = {"tollgate": cpu_seconds(pid), "upstream": cpu_seconds(upstream.pid), "client": sum(os.times()[:2])}
    final_rss = rss_kib(pid)

    # ---- after the load: idle out, fds back to the baseline --------------------------------
    # The upstream closes its idle keep-alive connections (the gateway's pool would otherwise
    # keep them for its 90 s idle timeout); the gateway must then let go of every socket.
    upstream_port = int(ports["main"].rsplit(":", 1)[1])
    idle_start = time.monotonic()
    fds_after = fd_count(pid)
    while time.monotonic() - idle_start < FD_WAIT and gateway.poll() is None:
        await try_get(upstream_port, "/__soak/close-idle", "POST")
        await asyncio.sleep(0.5)
        fds_after = fd_count(pid)
        if fds_after <= fd_baseline:
            break
    idle_secs = time.monotonic() - idle_start
    fd_after_targets = fd_targets(pid)

    seen = await try_get(upstream_port, "/__soak/seen")
    seen_text = seen.body.decode() if seen else None
    metrics = await try_get(ports["admin"], "/metrics")
    metrics = metrics.body.decode() if metrics else ""
    refused.close()

    alive_before_term = gateway.poll() is None
    term_at = time.monotonic()
    exit_code = None
    if alive_before_term:
        gateway.send_signal(signal.SIGTERM)
        try:
            exit_code = gateway.wait(15)
        except subprocess.TimeoutExpired:
            exit_code = "still running 15 s after SIGTERM"
    else:
        exit_code = gateway.returncode
    term_secs = time.monotonic() - term_at

    return report(
        args, tally, samples, alive, alive_before_term, exit_code, term_secs, reloads, load_secs, final_rss,
        fd_baseline, fds_after, idle_secs, fd_baseline_targets, fd_after_targets, seen_text, metrics,
        cpu0, cpu1, gateway_log,
    )


def metric_sum(metrics, name, label_filter=""):
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if label_filter in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def mib(kib):
    return f"{kib / 1024:.1f} MiB"


def report(args, tally, samples, alive, alive_before_term, exit_code, term_secs, reloads, load_secs, final_rss,
           fd_baseline, fds_after, idle_secs, fd_baseline_targets, fd_after_targets, seen_text, metrics,
           cpu0, cpu1, gateway_log):
    checks = []  # (name, ok, detail)
    total = sum(tally.sent.values())
    answered = sum(sum(c.values()) for c in tally.status.values())
    failures = collections.Counter()
    for c in tally.failures.values():
        failures.update(c)

    # ---- requests by class ----
    statuses = sorted({s for c in tally.status.values() for s in c})
    print()
    print(f"tollgate soak: {args.seconds} s of load ({load_secs:.1f} s measured), {total} requests "
          f"({total / load_secs:.0f} req/s), {reloads['sent']} reloads")
    print()
    head = f"{'class':<18} {'sent':>7} " + " ".join(f"{s:>6}" for s in statuses) + f" {'failed':>6} {'to upstream':>11} {'p99 ms':>7}  what"
    print(head)
    print("-" * len(head))
    expected_by_class = collections.Counter(tally.expected.values())
    for cls in CLASSES:
        lat = sorted(tally.latency[cls])
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else 0
        print(f"{cls:<18} {tally.sent[cls]:>7} " + " ".join(f"{tally.status[cls][s]:>6}" for s in statuses)
              + f" {sum(tally.failures[cls].values()):>6} {expected_by_class[cls]:>11} {p99:>7.1f}  {CLASS_NOTES[cls]}")
    print(f"{'total':<18} {total:>7} " + " ".join(f"{sum(tally.status[c][s] for c in CLASSES):>6}" for s in statuses)
          + f" {sum(failures.values()):>6} {len(tally.expected):>11}")
    print()

    # ---- no crash ----
    checks.append(("alive throughout", alive["tollgate"] and alive_before_term,
                   f"{len(samples)} samples, 1 per second" if alive["tollgate"] else "tollgate exited during the run; see " + gateway_log))
    checks.append(("exit 0 on SIGTERM", exit_code == 0, f"exit {exit_code} after {term_secs:.2f} s"))
    if not alive["upstream"]:
        checks.append(("fault upstream alive", False, "the upstream exited during the run"))

    # ---- RSS ----
    settle_at = args.seconds * SETTLE_FRACTION
    settled = next((s for s in samples if s[0] >= settle_at), samples[-1] if samples else (0, 0, 0))
    last = samples[-1] if samples else (0, final_rss, 0)
    after = [s[1] for s in samples if s[0] >= settled[0]] or [0]
    change = (last[1] - settled[1]) / settled[1] if settled[1] else float("inf")
    trend = ", ".join(f"{mib(next((s for s in samples if s[0] >= f * args.seconds), last)[1])}" for f in (0, 0.2, 0.4, 0.6, 0.8)) + f", {mib(last[1])}"
    running = alive["tollgate"] and alive_before_term
    checks.append(("RSS within 10% of settled", running and abs(change) <= RSS_TOLERANCE,
                   f"settled {mib(settled[1])} (at {settled[0]:.0f} s), final {mib(last[1])} ({change * 100:+.1f}%), "
                   f"peak after settling {mib(max(after))}; at 0/20/40/60/80/100%: {trend}"))

    # ---- fds ----
    peak_fds = max((s[2] for s in samples), default=0)
    fd_detail = f"baseline {fd_baseline}, peak {peak_fds} under load, {fds_after} after load ({idle_secs:.1f} s after it stopped)"
    if fds_after > fd_baseline:
        extra = {k: v - fd_baseline_targets.get(k, 0) for k, v in fd_after_targets.items() if v > fd_baseline_targets.get(k, 0)}
        fd_detail += f"; extra: {extra}"
    if not running:
        fd_detail = "tollgate was not running at the end: " + fd_detail
    checks.append(("fds back to baseline", running and fds_after <= fd_baseline, fd_detail))

    # ---- every request answered, at the client ----
    checks.append(("every request answered (client)", answered == total and not failures,
                   f"{total} sent, {answered} answered with an allowed status and envelope; failures: "
                   + (", ".join(f"{k} {v}" for k, v in sorted(failures.items())) or "none")))

    # ---- at the upstream ----
    seen = collections.Counter()
    wrong_listener = 0
    for line in (seen_text or "").splitlines():
        listener, rid = line.split(" ", 1)
        seen[rid] += 1
        cls = tally.expected.get(rid)
        if cls is not None and LISTENER.get(cls, "main") != listener:
            wrong_listener += 1
    expected = set(tally.expected)
    missing = expected - set(seen)
    extra = set(seen) - expected
    dup = {rid: n for rid, n in seen.items() if n > 1}
    upstream_total = sum(seen.values())
    ok = not missing and not extra and not dup and not wrong_listener and upstream_total == len(expected)
    detail = (f"client expected {len(expected)} proxied, upstream saw {upstream_total} "
              f"(missing {len(missing)}, unexpected {len(extra)}, duplicated {len(dup)}, wrong listener {wrong_listener})")
    if seen_text is None:
        ok, detail = False, "the fault upstream did not answer /__soak/seen"
    if missing:
        detail += f"; missing e.g. {sorted(missing)[:5]}"
    if extra:
        detail += f"; unexpected e.g. {sorted(extra)[:5]}"
    if dup:
        detail += f"; duplicated e.g. {sorted(dup.items())[:5]}"
    checks.append(("every request answered (upstream)", ok, detail))

    # ---- tollgate's own count and reloads ----
    counted = metric_sum(metrics, "tollgate_requests_total")
    # The readiness probes went to the admin listener, which is not counted.
    checks.append(("tollgate counted every request", counted == total, f"tollgate_requests_total {counted:.0f}, client {total}"))
    reload_ok = metric_sum(metrics, "tollgate_config_reloads_total", 'result="ok"')
    reload_failed = metric_sum(metrics, "tollgate_config_reloads_total", 'result="failed"')
    # Both configs were in force: each left its mark on some answer.
    applied = reloads["sent"] == 0 or (
        {"120", "60"} <= set(tally.limit_values) and tally.ietf_headers > 0 and tally.status["rotated-key"][200] > 0
    )
    checks.append(("every reload applied", reload_ok == reloads["sent"] and reload_failed == 0 and applied,
                   f"{reloads['sent']} SIGHUPs, {reload_ok:.0f} ok, {reload_failed:.0f} failed; over-limit X-RateLimit-Limit seen "
                   f"{dict(sorted(tally.limit_values.items()))}, RateLimit-Policy on {tally.ietf_headers} answers, "
                   f"rotated key 200/401: {tally.status['rotated-key'][200]}/{tally.status['rotated-key'][401]}"))

    kinds = {}
    for line in metrics.splitlines():
        m = re.match(r'tollgate_upstream_failures_total\{.*kind="([^"]+)".*\} (\S+)', line)
        if m and float(m.group(2)):
            kinds[m.group(1)] = kinds.get(m.group(1), 0) + int(float(m.group(2)))
    cpu = {k: (cpu1[k] - cpu0[k]) / load_secs * 100 for k in cpu0}

    width = max(len(c[0]) for c in checks)
    print(f"{'check':<{width}}  result  detail")
    print("-" * (width + 80))
    for name, ok, detail in checks:
        print(f"{name:<{width}}  {'ok' if ok else 'FAILED':<6}  {detail}")
    print()
    print(f"upstream failures by kind (tollgate metrics): {kinds or 'none'}")
    print(f"CPU under load (% of one core): tollgate {cpu['tollgate']:.0f}%, fault upstream {cpu['upstream']:.0f}%, "
          f"load generator {cpu['client']:.0f}%; {os.cpu_count()} CPUs")
    if tally.examples:
        print("first failures:")
        for e in tally.examples:
            print("  " + e)
    if args.samples:
        with open(args.samples, "w") as f:
            f.write("seconds,rss_kib,fds\n")
            f.writelines(f"{t:.1f},{rss},{fds}\n" for t, rss, fds in samples)
    failed = [c[0] for c in checks if not c[1]]
    print()
    print("soak: " + ("every check passed" if not failed else "FAILED: " + ", ".join(failed)))
    if failed:
        print(f"tollgate's log (last 20 lines of {gateway_log}):")
        with open(gateway_log) as f:
            for line in f.readlines()[-20:]:
                print("  " + line.rstrip()[:400])
    return 0 if not failed else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--work", required=True, help="a private temporary directory")
    parser.add_argument("--tollgate", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--samples", help="also write the per-second samples (t, RSS KiB, fds) here as CSV")
    args = parser.parse_args()
    args.tollgate, args.upstream = os.path.abspath(args.tollgate), os.path.abspath(args.upstream)
    procs = {}
    pids_file = os.path.join(args.work, "pids")
    try:
        code = asyncio.run(soak(args, procs, pids_file))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if os.path.exists(pids_file):
            os.remove(pids_file)
    sys.exit(code)


if __name__ == "__main__":
    main()
