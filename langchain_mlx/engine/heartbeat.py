"""Knowing at once when a rank of a sharded model is gone.

MLX's ring backend does not report a dead peer reliably: the first collective
after a rank dies may raise, or may return this rank's own data as if it were
the sum, and the next one then blocks forever (measured with mlx 0.32). So
the ranks do not learn of a death from the collectives. Each other rank keeps
one TCP connection to rank 0 open for the life of the engine (its address is
rank 0's host in the group's hostfile, its port shared in the first plan).
The operating system closes it when the process dies, however it dies, so
the other side reads the end at once:

- rank 0 then fails the engine with `DistributedError` (readers get it within
  their poll interval, whatever the worker thread is blocked in);
- another rank then ends its process (status 1).

A clean end says "bye" first, so it is not taken for a death. Nothing but
that word ever travels here: requests and steps go through MLX collectives.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

BYE = b"bye\n"


def leader_host() -> str | None:
    """Rank 0's address, as `mlx.launch` tells each rank (ring, JACCL, NCCL)."""
    path = os.environ.get("MLX_HOSTFILE")
    try:
        if path:
            with open(path, encoding="utf-8") as f:
                hosts = json.load(f)
            first = hosts[0][0] if isinstance(hosts[0], list) else hosts[0]
            return str(first).rsplit(":", 1)[0]
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        logger.debug("no rank 0 address in the hostfile", exc_info=True)
    coordinator = os.environ.get("MLX_JACCL_COORDINATOR")  # JACCL: rank 0's ip:port
    if coordinator:
        return coordinator.rsplit(":", 1)[0]
    return os.environ.get("NCCL_HOST_IP") or None  # NCCL: rank 0's ip


class Heartbeat:
    """One connection per other rank to rank 0; its end means a death."""

    def __init__(self, on_lost: Callable[[str], None]) -> None:
        self._on_lost = on_lost
        self._ending = threading.Event()
        self._sockets: list[socket.socket] = []
        self._server: socket.socket | None = None

    def listen(self) -> int:
        """Rank 0: open the port the other ranks connect to; return it."""
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("0.0.0.0", 0))
        server.listen()
        self._server = server
        return int(server.getsockname()[1])

    def accept(self, followers: int, timeout: float) -> None:
        """Rank 0: take the other ranks' connections and watch them."""
        assert self._server is not None
        self._server.settimeout(timeout)
        try:
            for _ in range(followers):
                conn, _ = self._server.accept()
                conn.settimeout(None)
                self._watch(conn, "a rank")
        except OSError as e:
            self._lost(f"a rank did not connect its heartbeat ({e})")
        finally:
            self._server.close()

    def connect(self, host: str, port: int, timeout: float) -> None:
        """Another rank: connect to rank 0 and watch the connection."""
        conn = socket.create_connection((host, port), timeout=timeout)
        conn.settimeout(None)
        self._watch(conn, "rank 0")

    def _watch(self, conn: socket.socket, who: str) -> None:
        self._sockets.append(conn)

        def wait_for_end() -> None:
            said = b""
            try:
                while chunk := conn.recv(16):
                    said += chunk
            except OSError:
                pass
            if said.endswith(BYE) or self._ending.is_set():
                return
            self._lost(f"{who} is gone (its process ended or the network broke)")

        threading.Thread(
            target=wait_for_end, name="langchain-mlx-heartbeat", daemon=True
        ).start()

    def _lost(self, why: str) -> None:
        if not self._ending.is_set():
            self._ending.set()
            self._on_lost(why)

    def drop(self) -> None:
        """Give up on the group: close without a goodbye (the others end, status 1)."""
        self._ending.set()
        for conn in self._sockets:
            try:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            except OSError:
                pass

    def bye(self) -> None:
        """A clean end: tell the other side, so the closing is not a death."""
        self._ending.set()
        for conn in self._sockets:
            try:
                conn.sendall(BYE)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
