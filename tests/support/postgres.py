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


@contextmanager
def postgres_server():
    """Yield a SQLAlchemy URL for a fresh database; stop and delete the server afterwards."""
    root = Path(tempfile.mkdtemp(prefix="speechtune-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = _free_port()
    subprocess.run(_as_postgres([_bin("initdb"), "-D", str(data), "-U", "speechtune", "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True)
    options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=on -c max_connections=50"
    subprocess.run(_as_postgres([_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"]),
                   check=True, capture_output=True)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start; see {root / 'log'}")
            time.sleep(0.2)
        subprocess.run([_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "speechtune", "speechtune"], check=True)
        yield f"postgresql+psycopg://speechtune@127.0.0.1:{port}/speechtune"
    finally:
        subprocess.run(_as_postgres([_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
