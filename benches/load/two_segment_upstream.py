#!/usr/bin/env python3
"""The two-segment upstream of the load comparison (benches/load/compare.sh).

An HTTP/1.1 keep-alive server that answers every request `200 ok` with Content-Length, writing
the response head and the body in two separate send() calls on a socket with Nagle's algorithm
on (TCP_NODELAY off), as Python's http.server does with protocol_version = "HTTP/1.1". The body
is then held back by Nagle until the head is acknowledged; a peer that delays its ACK (Linux:
40 ms at least) waits that long for the body, one that acknowledges at once (TCP_QUICKACK) does
not. One thread per connection.

Usage: two_segment_upstream.py [HOST:PORT]   (default 127.0.0.1:3001)
"""
import socket
import sys
import threading

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n"
BODY = b"ok"


def serve(conn):
    try:
        answer(conn)
    except OSError:
        pass  # a gateway that goes away (reset) mid-connection: nothing to report
    finally:
        conn.close()


def answer(conn):
    """Answers the requests of one connection until the peer closes it or asks to."""
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(fields.get("content-length", "0") or "0")
        while len(buf) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        buf = buf[length:]
        conn.sendall(HEAD)  # first segment: sent at once (nothing unacknowledged)
        conn.sendall(BODY)  # second segment: Nagle holds it until the head is acknowledged
        if fields.get("connection", "").lower() == "close" or lines[0].endswith("HTTP/1.0"):
            return


def main():
    host, _, port = (sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:3001").rpartition(":")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(256)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)  # Nagle on (the default, said out loud)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
