"""pytest fixtures for tests that need the real control plane from tests/cluster (marker `cluster`).

`kube_cluster` reuses the cluster KUBECONFIG points at when it answers, else runs
tests/cluster/up; it tears down only a cluster it started itself (unless
SPEECHTUNE_KEEP_CLUSTER=1). `kube_namespace` gives each test a fresh namespace.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

CLUSTER_DIR = Path(__file__).resolve().parent


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call whose message carries kubectl's stderr (the actual cause)."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {self.stderr.strip()}"


@dataclass
class KubeCluster:
    kubeconfig: str
    env: dict[str, str]

    @property
    def state_dir(self) -> Path | None:
        """The tests/cluster/up state dir (pids, logs) when this is that cluster, else None."""
        parent = Path(self.kubeconfig).resolve().parent
        return parent if (parent / "pids").is_dir() else None

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess:
        """Runs the real kubectl (from tests/cluster/tools, never a gcloud wrapper) against this cluster."""
        exe = shutil.which("kubectl", path=self.env["PATH"])
        proc = subprocess.run([exe, *args], env=self.env, input=input, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode:
            raise KubectlError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc


def tools_env() -> dict[str, str]:
    """The environment with real kubectl and helm (tests/cluster/tools) first on PATH."""
    tools_bin = subprocess.run([CLUSTER_DIR / "tools"], check=True, capture_output=True, text=True).stdout.strip()
    return dict(os.environ, PATH=f"{tools_bin}{os.pathsep}{os.environ.get('PATH', '')}")


def _reachable(env: dict[str, str]) -> bool:
    kubectl = shutil.which("kubectl", path=env["PATH"])
    probe = subprocess.run([kubectl, "get", "--raw", "/readyz", "--request-timeout=5s"], env=env,
                           capture_output=True)
    return probe.returncode == 0


def _parse_exports(text: str, env: dict[str, str]) -> dict[str, str]:
    """Applies up's `export NAME=VALUE` lines (VALUE may reference $PATH) to env."""
    env = dict(env)
    for name, value in re.findall(r"^export (\w+)=(.*)$", text, re.MULTILINE):
        env[name] = value.replace("$PATH", env.get("PATH", ""))
    return env


@pytest.fixture(scope="session")
def kube_cluster():
    env = tools_env()
    if env.get("KUBECONFIG") and _reachable(env):
        yield KubeCluster(env["KUBECONFIG"], env)
        return
    state = Path(os.environ.get("SPEECHTUNE_CLUSTER_DIR",
                                Path.home() / ".cache" / "speechtune" / "cluster" / "state"))
    was_running = _reachable(dict(env, KUBECONFIG=str(state / "admin.kubeconfig")))
    up = subprocess.run([CLUSTER_DIR / "up"], capture_output=True, text=True)
    if up.returncode:
        pytest.fail(f"tests/cluster/up failed ({up.returncode}):\n{up.stderr[-4000:]}", pytrace=False)
    env = _parse_exports(up.stdout, env)
    try:
        yield KubeCluster(env["KUBECONFIG"], env)
    finally:
        if not was_running and os.environ.get("SPEECHTUNE_KEEP_CLUSTER") != "1":
            subprocess.run([CLUSTER_DIR / "down"], check=True)


@pytest.fixture
def kube_namespace(kube_cluster: KubeCluster, request: pytest.FixtureRequest):
    """A fresh namespace, ready for pods (its default ServiceAccount exists), deleted afterwards."""
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", name)
    deadline = time.monotonic() + 30
    while kube_cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode:
        if time.monotonic() > deadline:
            pytest.fail(f"namespace {name}: the serviceaccount controller never created 'default'")
        time.sleep(0.2)
    yield name
    kube_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: needs the real control plane from tests/cluster/")
