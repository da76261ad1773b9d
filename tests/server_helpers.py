"""Local TCP servers that misbehave (close at once, stall, trickle), for tests of URL inputs."""

from __future__ import annotations

import socket
import threading


def raw_server(behaviour, path: str = "/image.png"):
    """A TCP server on 127.0.0.1 whose connections are handled by behaviour(conn, stop); returns (url, stop)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=behaviour, args=(conn, stop), daemon=True).start()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}{path}", stop.set


def close_at_once(conn, stop):
    conn.recv(1024)
    conn.close()


def stall(conn, stop):
    conn.recv(1024)
    stop.wait(10)  # never answers
    conn.close()


def trickle(conn, stop):
    """Headers, then a byte every 0.1 s: every read succeeds, the whole never arrives in time."""
    conn.recv(1024)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n")
    while not stop.wait(0.1):
        try:
            conn.sendall(b"x")
        except OSError:
            break
    conn.close()
