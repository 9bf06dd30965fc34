"""pytest fixtures for tests that need the real control plane from tests/cluster (marker `cluster`).

`kube_cluster` reuses the cluster KUBECONFIG points at when it answers, else runs
tests/cluster/up; it tears down only a cluster it started itself (unless
SPEECHTUNE_KEEP_CLUSTER=1). `kube_namespace` gives each test a fresh namespace.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
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


# -- kube-apiserver outages: killed, then started again with the same command line ---------------------------------
_restarted: list[subprocess.Popen] = []  # the API servers started here (kept: a Popen collected while running warns)
_commands: dict[Path, tuple[list[str], str]] = {}  # state dir -> the killed API server's command line and cwd


@dataclass
class Outage:
    """One kube-apiserver outage: when it began and when the API server was ready again (time.monotonic())."""

    began: float
    back: float | None = None

    @property
    def seconds(self) -> float | None:
        return None if self.back is None else self.back - self.began


def _gone(pid: int) -> bool:
    """The process has exited (a zombie counts as gone)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # ours (started by a restart here): reap it
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def wait_ready(cluster: KubeCluster, timeout: float = 90) -> None:
    """Until the API server answers /readyz (every component reconnects on its own)."""
    deadline = time.monotonic() + timeout
    while cluster.kubectl("get", "--raw", "/readyz", "--request-timeout=2s", check=False, timeout=10).returncode:
        if time.monotonic() > deadline:
            log = cluster.state_dir / "logs" / "kube-apiserver.log" if cluster.state_dir else None
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"kube-apiserver not ready {timeout:.0f} s after its restart:\n{tail}")
        time.sleep(0.2)


@contextlib.contextmanager
def apiserver_stopped(cluster: KubeCluster, sig: int = signal.SIGKILL):
    """kube-apiserver killed (``sig``) on entry and started again on exit, even when the body fails, with the
    command line, working directory, log and pid file of tests/cluster/up; the exit returns once /readyz
    answers. Yields an ``Outage``. Only for the cluster tests/cluster/up runs (else the test is skipped):
    other tests share it, so keep the body short."""
    state = cluster.state_dir
    if state is None:
        pytest.skip("restarting kube-apiserver needs the tests/cluster/up cluster (its pid files)")
    pid_file = state / "pids" / "kube-apiserver"
    pid = int(pid_file.read_text())
    if _gone(pid):
        raise RuntimeError(f"kube-apiserver (pid {pid}) is not running")
    argv = [arg.decode() for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    cwd = os.readlink(f"/proc/{pid}/cwd")
    _commands[state] = (argv, cwd)
    outage = Outage(time.monotonic())
    try:
        os.kill(pid, sig)
        deadline = time.monotonic() + 30
        while not _gone(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        yield outage
    finally:
        _start_apiserver_if_gone(state)
        wait_ready(cluster)
        outage.back = time.monotonic()


def _start_apiserver_if_gone(state: Path) -> None:
    pid_file = state / "pids" / "kube-apiserver"
    if not _gone(int(pid_file.read_text())) or state not in _commands:
        return
    argv, cwd = _commands[state]
    with open(state / "logs" / "kube-apiserver.log", "ab") as log:
        process = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    _restarted.append(process)
    pid_file.write_text(f"{process.pid}\n")


def wait_whole(cluster: KubeCluster, timeout: float = 120) -> None:
    """Until the cluster runs a Job to completion again: after a restart the API server answers before the
    controllers, scheduler and node agent have caught up (their watches back off, the Job controller's cache
    lags), and the next test, maybe another's, must find a working cluster."""
    name = f"canary-{uuid.uuid4().hex[:8]}"
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": "default"},
           "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [
               {"name": "canary", "image": "python:3.11", "command": ["python", "-c", "pass"]}]}}}}
    cluster.kubectl("create", "-f", "-", input=json.dumps(job))
    try:
        cluster.kubectl("wait", "--for=condition=Complete", f"job/{name}", "-n", "default", f"--timeout={timeout:.0f}s",
                        timeout=timeout + 30)
    finally:
        cluster.kubectl("delete", "job", name, "-n", "default", "--cascade=background", "--wait=false", check=False)


@pytest.fixture
def apiserver_outage(kube_cluster: KubeCluster):
    """``apiserver_stopped`` for this cluster (``with apiserver_outage() as outage: ...``). Afterwards, passed or
    failed, the API server runs and the cluster runs a Job again (``wait_whole``): other tests share it."""
    if kube_cluster.state_dir is None:
        pytest.skip("restarting kube-apiserver needs the tests/cluster/up cluster (its pid files)")
    yield functools.partial(apiserver_stopped, kube_cluster)
    _start_apiserver_if_gone(kube_cluster.state_dir)
    wait_ready(kube_cluster)
    wait_whole(kube_cluster)


def restart_apiserver(cluster: KubeCluster, down_seconds: float) -> Outage:
    """Kill kube-apiserver, leave it down ``down_seconds``, start it again; returns once it is ready."""
    with apiserver_stopped(cluster) as outage:
        time.sleep(down_seconds)
    return outage


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: needs the real control plane from tests/cluster/")
