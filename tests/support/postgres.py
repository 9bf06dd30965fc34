"""A throwaway PostgreSQL server on loopback, from Debian's postgresql package.

Used by tests and benchmarks that must show behaviour against a real server.
PostgreSQL refuses to run as root, so as root the server runs as ``postgres``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found: run bin/setup (apt-get install postgresql)")
    return found[-1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


class PostgresServer:
    """A running server; ``stop``/``start`` simulate an outage of the database."""

    def __init__(self, root: Path, port: int):
        self.root = root
        self.port = port
        self.url = f"postgresql+psycopg://speechtune@127.0.0.1:{port}/speechtune"

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c max_connections=50"
        subprocess.run(_as_postgres([_bin("pg_ctl"), "-D", str(self.root / "data"), "-o", options,
                                     "-l", str(self.root / "log"), "-w", "start"]), check=True, capture_output=True)
        deadline = time.monotonic() + 30
        while subprocess.run([_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start; see {self.root / 'log'}")
            time.sleep(0.2)

    def stop(self) -> None:
        subprocess.run(_as_postgres([_bin("pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "stop"]),
                       capture_output=True)


@contextmanager
def postgres_server():
    """Yield a started PostgresServer with an empty database; delete it all afterwards."""
    root = Path(tempfile.mkdtemp(prefix="speechtune-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    subprocess.run(_as_postgres([_bin("initdb"), "-D", str(root / "data"), "-U", "speechtune", "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True)
    server = PostgresServer(root, _free_port())
    try:
        server.start()
        subprocess.run([_bin("createdb"), "-h", "127.0.0.1", "-p", str(server.port), "-U", "speechtune", "speechtune"], check=True)
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
