#!/usr/bin/env python3
"""Large bodies for `benches/load.sh --bodies`: its upstream and its client.

    bodies.py upstream PORT FILE
        An HTTP/1.1 server on 127.0.0.1:PORT, a thread per connection,
        keep-alive. GET answers 200 with FILE (application/octet-stream,
        Content-Length, sent with sendfile(2): no copy through Python).
        POST reads the whole request body (Content-Length or chunked) into
        a 1 MiB buffer and drops it, then answers 200 with a small JSON:
        an upstream that reads the body before it answers, as an API does
        (nginx's `return 200` answers first and discards the body after,
        an early answer that is another case).

    bodies.py get PORT PATH HEADER N
    bodies.py post PORT PATH HEADER N SIZE
        N downloads of PATH, or N uploads (POST) of SIZE bytes, one after
        another over one keep-alive connection to 127.0.0.1:PORT (a new one
        if the server closes it), sending HEADER ("Name: value", or "" for
        none). Every answer must be 200, and a download's body whole (by
        Content-Length or chunked). Bodies are read with recv_into a 1 MiB
        buffer and sent with one sendall of a memoryview, so the client's
        own cost is a few hundred system calls per transfer and the
        kernel's copies. Prints one line, tab-separated: transfers, body
        bytes moved (downloaded or uploaded), wall seconds from the first
        request to the last answer's end, and the client's own CPU seconds
        (user + system).

Everything listens on and connects to 127.0.0.1 only.
"""

import os
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 1 << 20


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    file = ""
    size = 0

    def setup(self):
        super().setup()
        # The head and the body are two writes: without this, Nagle holds
        # the second until the client's delayed ACK (40 ms per answer).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(self.size))
        self.end_headers()
        with open(self.file, "rb") as f:
            self.connection.sendfile(f)

    def do_POST(self):
        scratch = memoryview(bytearray(CHUNK))
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                self.drop(scratch, size)
                self.rfile.readline()
        else:
            self.drop(scratch, int(self.headers.get("Content-Length") or 0))
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def drop(self, scratch, left):
        while left > 0:
            n = self.rfile.readinto1(scratch[: min(left, CHUNK)])
            if not n:
                raise ConnectionError("request body cut short")
            left -= n

    def log_message(self, *args):
        pass


class Conn:
    """One client connection with its read buffer."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.scratch = memoryview(bytearray(CHUNK))

    def fill(self):
        n = self.sock.recv_into(self.scratch)
        if n == 0:
            raise ConnectionError("the server closed the connection")
        self.buf += self.scratch[:n]

    def line(self):
        while (i := self.buf.find(b"\r\n")) < 0:
            self.fill()
        line = bytes(self.buf[:i])
        del self.buf[: i + 2]
        return line

    def skip(self, left):
        """Reads and drops `left` bytes (never more)."""
        take = min(left, len(self.buf))
        del self.buf[:take]
        left -= take
        while left > 0:
            n = self.sock.recv_into(self.scratch, min(left, CHUNK))
            if n == 0:
                raise ConnectionError("body cut short")
            left -= n

    def answer(self):
        """Reads one answer: its body's length; whether the connection stays."""
        status = self.line().split(b" ", 2)
        if len(status) < 2 or status[1] != b"200":
            raise ConnectionError(f"answer {status!r}, not 200")
        headers = {}
        while line := self.line():
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        keep = headers.get(b"connection") != b"close"
        if b"chunked" in headers.get(b"transfer-encoding", b""):
            total = 0
            while size := int(self.line().split(b";")[0], 16):
                self.skip(size + 2)
                total += size
            while self.line():
                pass
            return total, keep
        length = int(headers.get(b"content-length", b"-1"))
        if length < 0:
            raise ConnectionError("answer without a length")
        self.skip(length)
        return length, keep


def client(mode, port, path, header, n, size):
    head = f"{'GET' if mode == 'get' else 'POST'} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if header:
        head += header + "\r\n"
    if mode == "post":
        head += f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n"
        body = memoryview(os.urandom(size))
    head = (head + "\r\n").encode()
    moved = 0
    cpu0 = sum(os.times()[:2])
    t0 = time.perf_counter()
    conn = Conn(port)
    for _ in range(n):
        conn.sock.sendall(head)
        if mode == "post":
            conn.sock.sendall(body)
            moved += size
            _, keep = conn.answer()
        else:
            got, keep = conn.answer()
            moved += got
        if not keep:
            conn.sock.close()
            conn = Conn(port)
    secs = time.perf_counter() - t0
    cpu = sum(os.times()[:2]) - cpu0
    conn.sock.close()
    print(f"{n}\t{moved}\t{secs:.4f}\t{cpu:.4f}")


def main(argv):
    if len(argv) == 4 and argv[1] == "upstream":
        Upstream.file = argv[3]
        Upstream.size = os.path.getsize(argv[3])
        server = ThreadingHTTPServer(("127.0.0.1", int(argv[2])), Upstream)
        server.daemon_threads = True
        server.serve_forever()
    elif len(argv) == 6 and argv[1] == "get":
        client("get", int(argv[2]), argv[3], argv[4], int(argv[5]), 0)
    elif len(argv) == 7 and argv[1] == "post":
        client("post", int(argv[2]), argv[3], argv[4], int(argv[5]), int(argv[6]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
