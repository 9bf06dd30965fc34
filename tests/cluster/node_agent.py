"""Process-based kubelet stand-in for the speechtune test cluster.

Registers GPU Nodes, keeps them Ready, runs the containers of pods bound to them as
local subprocesses (no image pull: `command` + `args` run on this machine) and reports
their status like a kubelet would, so the real scheduler, Job controller and garbage
collector can be tested without containers or GPUs. It also serves the kubelet
container-log endpoint so `kubectl logs [-f]` works through the API server.
See docs/cluster.md for the image -> local-execution mapping.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import http.server
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger("node-agent")
SMP = "application/strategic-merge-patch+json"
LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 10
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 0.5, 10.0  # status reports the API server did not take: backoff
REQUEST_TIMEOUT = (5, 15)  # connect, read: a hung API server must not hold a pod's status forever
POD_IP = "127.0.0.1"
RENDEZVOUS_PORT_VARS = ("MASTER_PORT", "PET_MASTER_PORT")  # a pod with a subdomain: its Job's own loopback port


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def rfc3339(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ignore_gone(fn, *args, **kwargs):
    """Calls an API method, treating 404 (the object is already gone) as success."""
    try:
        return fn(*args, **kwargs)
    except ApiException as e:
        if e.status != 404:
            raise
        return None


def transient(error: Exception) -> bool:
    """A failure that passes with time (the API server restarting or overloaded): a kubelet retries these."""
    if isinstance(error, ApiException):
        return not error.status or error.status == 429 or error.status >= 500
    return isinstance(error, (urllib3.exceptions.HTTPError, OSError))


def describe(error: Exception) -> str:
    return f"{error.status} {error.reason}" if isinstance(error, ApiException) else f"{type(error).__name__}: {error}"


class ContainerConfigError(Exception):
    """The container's spec cannot be turned into a local process (kubelet: CreateContainerConfigError)."""


class ContainerRun:
    """One container of a pod: its process attempts, their log files and its reported status."""

    def __init__(self, pod_runner: PodRunner, spec: dict):
        self.pod_runner = pod_runner
        self.spec = spec
        self.name = spec["name"]
        self.restart_count = 0
        self.state: dict = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: dict = {}
        self.proc: subprocess.Popen | None = None
        self.log_paths: list[Path] = []
        self.attempt_done = threading.Event()
        self.killed_by_agent = False

    def running(self) -> bool:
        return "running" in self.state

    def exited(self) -> bool:
        return "terminated" in self.state

    def status(self) -> dict:
        """containerStatuses[] entry; unset state keys are sent as null so the patch replaces them."""
        pid = self.proc.pid if self.proc else None
        return {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "containerID": f"speechtune://{pid}" if pid else None,
            "ready": self.running(),
            "started": self.running(),
            "restartCount": self.restart_count,
            "state": {key: self.state.get(key) for key in ("waiting", "running", "terminated")},
            "lastState": {key: self.last_state.get(key) for key in ("waiting", "running", "terminated")},
        }

    def run_once(self) -> int:
        """Runs one attempt of the container to completion and returns its exit code."""
        runner = self.pod_runner
        log_path = runner.dir / "logs" / f"{self.name}-{self.restart_count}.log"
        self.log_paths.append(log_path)
        log_path.touch()
        self.attempt_done.clear()
        self.killed_by_agent = False
        started = now()
        try:
            argv, env = runner.container_process(self.spec)
            self.proc = subprocess.Popen(
                argv, env=env, cwd=runner.dir / "work", stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            )
        except (ContainerConfigError, OSError) as e:
            reason = "CreateContainerConfigError" if isinstance(e, ContainerConfigError) else "ContainerCannotRun"
            code = 128 if isinstance(e, ContainerConfigError) else 127
            log.warning("pod %s container %s cannot start: %s", runner.key, self.name, e)
            self.state = {"terminated": {"exitCode": code, "reason": reason, "message": str(e),
                                         "startedAt": rfc3339(started), "finishedAt": rfc3339(now())}}
            self.attempt_done.set()
            runner.report()
            return code
        log.info("pod %s container %s started: pid %d %s", runner.key, self.name, self.proc.pid, argv)
        self.state = {"running": {"startedAt": rfc3339(started)}}
        runner.report()
        copier = threading.Thread(target=self._copy_output, args=(self.proc.stdout, log_path), daemon=True)
        copier.start()
        rc = self.proc.wait()
        # Like a container runtime, the container ends with its main process: kill what it left behind.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        copier.join()
        code, reason = self._exit_code(rc)
        self.state = {"terminated": {"exitCode": code, "reason": reason, "startedAt": rfc3339(started),
                                     "finishedAt": rfc3339(now()), "containerID": f"speechtune://{self.proc.pid}"}}
        self.attempt_done.set()
        log.info("pod %s container %s exited: %s", runner.key, self.name, self.state["terminated"])
        runner.report()
        return code

    def _exit_code(self, rc: int) -> tuple[int, str]:
        """Maps a wait status to a container exit code and reason; an outside SIGKILL reads as the OOM killer's."""
        if rc >= 0:
            return rc, "Completed" if rc == 0 else "Error"
        if -rc == signal.SIGKILL and not self.killed_by_agent:
            return 128 + signal.SIGKILL, "OOMKilled"
        return 128 - rc, "Error"

    @staticmethod
    def _copy_output(pipe, log_path: Path) -> None:
        """Appends each output line to the log file, prefixed by its arrival time (for sinceTime/timestamps)."""
        with open(log_path, "ab", buffering=0) as out:
            for line in iter(pipe.readline, b""):
                if not line.endswith(b"\n"):
                    line += b"\n"
                out.write(micro_time(now()).encode() + b" " + line)
        pipe.close()

    def run_with_restarts(self, policy: str) -> None:
        """Runs the container, restarting it as the pod's restartPolicy says until the pod is deleted."""
        while True:
            code = self.run_once()
            runner = self.pod_runner
            if runner.deleting.is_set() or not (policy == "Always" or (policy == "OnFailure" and code != 0)):
                return
            backoff = min(10, 2 ** self.restart_count)
            self.last_state, self.state = self.state, {"waiting": {"reason": "CrashLoopBackOff"}}
            self.restart_count += 1
            runner.report()
            if runner.deleting.wait(backoff):
                self.state, self.last_state = self.last_state, {}
                return

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.killed_by_agent = self.killed_by_agent or sig == signal.SIGKILL
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass


class PodRunner(threading.Thread):
    """Runs one pod's containers and owns its status, from binding to final deletion."""

    def __init__(self, agent: NodeAgent, pod: dict):
        super().__init__(daemon=True, name=f"pod-{pod['metadata']['name']}")
        self.agent = agent
        self.pod = pod
        meta = pod["metadata"]
        self.key = f"{meta['namespace']}/{meta['name']}"
        self.uid = meta["uid"]
        self.dir = agent.state_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{self.uid}"
        spec = pod["spec"]
        self.init_runs = [ContainerRun(self, c) for c in spec.get("initContainers") or []]
        self.runs = [ContainerRun(self, c) for c in spec["containers"]]
        self.deleting = threading.Event()
        self.init_failed = False
        self.start_time = now()
        self.transitions: dict[str, tuple[str, str]] = {}
        self.report_lock = threading.Lock()
        self.done_lock = threading.Lock()
        self.done = False
        self.unsent: dict | None = None  # the newest status, until the API server has taken it
        self.retrying = False  # a thread is sending ``unsent`` again (report_lock guards both)
        self.gone = threading.Event()  # the pod object vanished, or the agent stops: nothing more to report

    def container(self, name: str) -> ContainerRun | None:
        return next((c for c in self.init_runs + self.runs if c.name == name), None)

    def run(self) -> None:
        try:
            (self.dir / "logs").mkdir(parents=True, exist_ok=True)
            (self.dir / "work").mkdir(exist_ok=True)
            self.report()
            for init in self.init_runs:
                if self.deleting.is_set():
                    break
                if init.run_once() != 0:
                    self.init_failed = True
                    break
            if not self.init_failed and not self.deleting.is_set():
                policy = self.pod["spec"].get("restartPolicy", "Always")
                threads = [threading.Thread(target=c.run_with_restarts, args=(policy,), daemon=True) for c in self.runs]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            self.report()
            with self.done_lock:
                self.done = True
                deleting = self.deleting.is_set()
            if deleting:
                self.finish_deletion()
        except Exception:
            log.exception("pod %s: runner failed", self.key)

    def update(self, pod: dict) -> None:
        """Takes the newest pod object; a first deletionTimestamp starts graceful termination."""
        self.pod = pod
        meta = pod["metadata"]
        if not meta.get("deletionTimestamp") or self.deleting.is_set():
            return
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        with self.done_lock:
            self.deleting.set()
            done = self.done
        # A finished pod only needs its final removal; a running one is stopped first and removed by run().
        target, args = (self.finish_deletion, ()) if done else (self.terminate, (grace,))
        threading.Thread(target=target, args=args, daemon=True).start()

    def terminate(self, grace: float) -> None:
        """SIGTERM to every container's process group, SIGKILL to the survivors after the grace period."""
        log.info("pod %s deleted: stopping containers (grace %ss)", self.key, grace)
        live = self.init_runs + self.runs
        for c in live:
            c.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in live:
            while c.proc and c.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
        for c in live:
            c.signal(signal.SIGKILL)

    def finish_deletion(self) -> None:
        """Removes the pod for good once its containers are gone, as a kubelet does (grace period 0); while the
        API server is away, tries again with backoff."""
        meta = self.pod["metadata"]
        body = client.V1DeleteOptions(grace_period_seconds=0, preconditions=client.V1Preconditions(uid=self.uid))
        delay = RETRY_FIRST_SECONDS
        while True:
            try:
                ignore_gone(self.agent.core.delete_namespaced_pod, meta["name"], meta["namespace"],
                            grace_period_seconds=0, body=body, _request_timeout=REQUEST_TIMEOUT)
                break
            except Exception as e:
                if not transient(e):
                    raise
                log.warning("pod %s: final deletion failed (%s); retrying in %.1f s", self.key, describe(e), delay)
            if self.gone.wait(delay):
                return
            delay = min(delay * 2, RETRY_MAX_SECONDS)
        log.info("pod %s: deletion finished", self.key)

    def kill_now(self) -> None:
        """The pod object vanished (force deletion): its processes must not outlive it."""
        self.deleting.set()
        self.gone.set()
        for c in self.init_runs + self.runs:
            c.signal(signal.SIGKILL)

    # --- status

    def phase(self) -> str:
        if self.init_failed:
            return "Failed"
        if not all(c.exited() for c in self.runs):
            started = any(c.running() or c.restart_count for c in self.runs)
            return "Running" if started else "Pending"
        codes = [c.state["terminated"]["exitCode"] for c in self.runs]
        return "Succeeded" if all(code == 0 for code in codes) else "Failed"

    def condition(self, kind: str, ok: bool, reason: str | None = None) -> dict:
        status = "True" if ok else "False"
        previous = self.transitions.get(kind)
        if previous is None or previous[0] != status:
            self.transitions[kind] = (status, rfc3339(now()))
        # reason is always sent (null clears a stale one: the status patch merges conditions by type).
        return {"type": kind, "status": status, "reason": reason, "lastProbeTime": None,
                "lastTransitionTime": self.transitions[kind][1]}

    def report(self) -> None:
        """Patches the pod status from the containers' current states.

        As a kubelet's status manager does, a status the API server cannot take now (it restarts, it is
        overloaded) is not lost: a thread sends the newest status again, with backoff (0.5 s doubling to
        10 s), until it is taken or the pod is gone. The caller never waits for that.
        """
        with self.report_lock:
            phase = self.phase()
            terminal = phase in ("Succeeded", "Failed")
            initialized = all(c.exited() and c.state["terminated"]["exitCode"] == 0 for c in self.init_runs)
            ready = not terminal and all(c.running() for c in self.runs)
            ready_reason = "PodCompleted" if terminal else None if ready else "ContainersNotReady"
            status = {
                "phase": phase,
                "hostIP": POD_IP, "hostIPs": [{"ip": POD_IP}],
                "podIP": POD_IP, "podIPs": [{"ip": POD_IP}],
                "startTime": rfc3339(self.start_time),
                "conditions": [
                    self.condition("PodReadyToStartContainers", True),
                    self.condition("Initialized", initialized, None if initialized else "ContainersNotInitialized"),
                    self.condition("ContainersReady", ready, ready_reason),
                    self.condition("Ready", ready, ready_reason),
                    self.condition("PodScheduled", True),
                ],
                "containerStatuses": [c.status() for c in self.runs],
            }
            if self.init_runs:
                status["initContainerStatuses"] = [c.status() for c in self.init_runs]
            self.unsent = status
            if self.send_status() or self.retrying:
                return  # taken, or the retrying thread sends it (the lock keeps the order: each send is the newest)
            self.retrying = True
        threading.Thread(target=self.retry_report, daemon=True, name=f"report-{self.pod['metadata']['name']}").start()

    def send_status(self) -> bool:
        """Sends ``unsent`` (report_lock held); False when it failed for a reason that passes, so it must be sent again."""
        meta = self.pod["metadata"]
        try:  # the uid is a precondition: a status meant for this pod never lands on a namesake created meanwhile
            ignore_gone(self.agent.core.patch_namespaced_pod_status, meta["name"], meta["namespace"],
                        {"metadata": {"uid": self.uid}, "status": self.unsent}, _content_type=SMP,
                        _request_timeout=REQUEST_TIMEOUT)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            if transient(e):
                log.warning("pod %s: status update failed (%s); will retry", self.key, describe(e))
                return False
            log.error("pod %s: status update failed: %s %s", self.key, describe(e), getattr(e, "body", ""))
        self.unsent = None
        return True

    def retry_report(self) -> None:
        """Sends the newest status again, with backoff, until the API server takes it or the pod is gone."""
        delay = RETRY_FIRST_SECONDS
        while not self.gone.wait(delay):
            with self.report_lock:
                if self.unsent is None or self.send_status():  # None: a report() got it through meanwhile
                    self.retrying = False
                    log.info("pod %s: status update went through on retry", self.key)
                    return
            delay = min(delay * 2, RETRY_MAX_SECONDS)
        with self.report_lock:
            self.retrying = False

    # --- image -> local process

    def container_process(self, spec: dict) -> tuple[list[str], dict[str, str]]:
        """argv and environment for a container: its command + args with the pod's env, venv first on PATH."""
        meta = self.pod["metadata"]
        env = {
            "PATH": f"{self.agent.repo / '.venv' / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "HOSTNAME": self.pod["spec"].get("hostname") or meta["name"],
        }
        for source in spec.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = self.agent.config_map(meta["namespace"], source["configMapRef"])
            else:
                data = self.agent.secret(meta["namespace"], source["secretRef"])
            env.update({prefix + k: v for k, v in data.items()})
        for var in spec.get("env") or []:
            if "valueFrom" in var:
                value = self.env_from(var["valueFrom"])
                if value is None:
                    continue
            else:
                value = expand(var.get("value", ""), env)
            env[var["name"]] = value
        self.loopback_rendezvous(env)
        if not spec.get("command"):
            raise ContainerConfigError(
                f"container {spec['name']!r} has no command: the node agent cannot run image "
                f"{spec.get('image')!r}'s entrypoint, so the pod spec must set command")
        argv = [expand(a, env) for a in spec["command"] + (spec.get("args") or [])]
        mounts = self.claim_mounts(spec)
        return [rewrite_paths(a, mounts) for a in argv], {k: rewrite_paths(v, mounts) for k, v in env.items()}

    def claim_mounts(self, spec: dict) -> list[tuple[str, Path]]:
        """(mountPath, host directory) of each of the container's volumeMounts of a persistentVolumeClaim volume.

        A kubelet mounts the claim's volume; a local process cannot be given a mount of its own, so the agent
        translates paths instead (``rewrite_paths``). Other volume kinds are not mounted."""
        volumes = {v["name"]: v for v in self.pod["spec"].get("volumes") or []}
        mounts = []
        for mount in spec.get("volumeMounts") or []:
            claim = (volumes.get(mount["name"]) or {}).get("persistentVolumeClaim")
            if claim:
                host = self.agent.claim_dir(self.pod["metadata"]["namespace"], claim["claimName"])
                host = host / mount["subPath"] if mount.get("subPath") else host
                host.mkdir(parents=True, exist_ok=True)
                mounts.append((mount["mountPath"].rstrip("/") or "/", host))
        return sorted(mounts, key=lambda m: -len(m[0]))

    def loopback_rendezvous(self, env: dict[str, str]) -> None:
        """What a pod with a subdomain (a headless Service: an Indexed Job's rendezvous) gets from cluster DNS and
        its own network namespace, on one loopback: a variable naming a pod of its subdomain
        (``<hostname>.<subdomain>[.<namespace>[.svc[.cluster.local]]]``) reads 127.0.0.1, every pod's IP here; and
        MASTER_PORT / PET_MASTER_PORT read a free port of the Job's own, the same in all its pods, so that the
        rendezvous of Jobs that run at once do not meet on one port."""
        subdomain = self.pod["spec"].get("subdomain")
        if not subdomain:
            return
        namespace = self.pod["metadata"]["namespace"]
        pod_name = re.compile(rf"[a-z0-9]([-a-z0-9]*[a-z0-9])?\.{re.escape(subdomain)}"
                              rf"(\.{re.escape(namespace)}(\.svc(\.cluster\.local)?)?)?\.?")
        for name, value in env.items():
            if pod_name.fullmatch(value):
                env[name] = POD_IP
        for name in RENDEZVOUS_PORT_VARS:
            if name in env:
                env[name] = str(self.agent.rendezvous_port(self.rendezvous))

    @property
    def rendezvous(self) -> tuple[str, str] | None:
        """The pods that share a rendezvous port: those of one subdomain of one namespace (None: no subdomain)."""
        subdomain = self.pod["spec"].get("subdomain")
        return (self.pod["metadata"]["namespace"], subdomain) if subdomain else None

    def env_from(self, source: dict) -> str | None:
        meta = self.pod["metadata"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            fields = {
                "metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": self.uid,
                "spec.nodeName": self.pod["spec"].get("nodeName"),
                "spec.serviceAccountName": self.pod["spec"].get("serviceAccountName"),
                "status.podIP": POD_IP, "status.hostIP": POD_IP,
            }
            match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
            if match:
                return (meta.get(match[1]) or {}).get(match[2], "")
            if path not in fields:
                raise ContainerConfigError(f"unsupported fieldRef {path!r}")
            return fields[path]
        for kind, getter in (("configMapKeyRef", self.agent.config_map), ("secretKeyRef", self.agent.secret)):
            if kind in source:
                ref = source[kind]
                data = getter(meta["namespace"], ref)
                if ref["key"] not in data and not ref.get("optional"):
                    raise ContainerConfigError(f"key {ref['key']!r} not found in {kind} {ref['name']!r}")
                return data.get(ref["key"])
        raise ContainerConfigError(f"unsupported valueFrom {sorted(source)}")


def rewrite_paths(text: str, mounts: list[tuple[str, Path]]) -> str:
    """``text`` with each mount path that starts a path in it (the whole text, or after ``=``, ``:``, ``,``, a quote or
    a space, as in ``--checkpoint_dir=/checkpoints/x``, a PATH-like list or a JSON string) replaced by its host
    directory."""
    if not mounts:
        return text
    hosts = dict(mounts)
    paths = "|".join(re.escape(path) for path in hosts)  # longest first: a nested mount shadows its parent
    return re.sub(rf"(^|[=:,\"'\s])({paths})(?=$|[/:,\"'\s])", lambda m: m[1] + str(hosts[m[2]]), text)


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: defined variables are substituted, $$ escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


class NodeAgent:
    """Registers the nodes, keeps them alive and dispatches pod events to PodRunners."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.repo = Path(args.repo)
        self.state_dir = Path(args.state_dir)
        cfg = client.Configuration()
        config.load_kube_config(config_file=args.kubeconfig, client_configuration=cfg)
        cfg.connection_pool_maxsize = 32
        self.api = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self.api)
        self.coord = client.CoordinationV1Api(self.api)
        self.node_names = [f"{args.node_prefix}-{i}" for i in range(args.nodes)]
        self.node_uids: dict[str, str] = {}
        self.runners: dict[str, PodRunner] = {}
        self.by_name: dict[str, PodRunner] = {}
        self.lock = threading.RLock()  # re-entered by the SIGTERM handler on the main thread
        self.stopping = threading.Event()
        self.rendezvous_ports: dict[tuple[str, str], int] = {}  # (namespace, subdomain) -> its loopback port

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """The host directory behind a PersistentVolumeClaim: its bound PV's ``hostPath.path`` or ``local.path``
        (so every agent on this machine, and the test that made the PV, sees the same files), else
        ``<state dir>/volumes/<namespace>/<claim>``. An unbound claim cannot be mounted yet."""
        try:
            pvc = self.core.read_namespaced_persistent_volume_claim(claim, namespace, _request_timeout=REQUEST_TIMEOUT)
            if pvc.status.phase != "Bound" or not pvc.spec.volume_name:
                raise ContainerConfigError(f"persistentvolumeclaim {claim!r} is not bound (phase {pvc.status.phase})")
            pv = self.core.read_persistent_volume(pvc.spec.volume_name, _request_timeout=REQUEST_TIMEOUT).spec
        except ApiException as e:
            raise ContainerConfigError(f"persistentvolumeclaim {claim!r}: {e.reason}") from e
        source = pv.host_path or pv.local
        return Path(source.path) if source else self.state_dir / "volumes" / namespace / claim

    def rendezvous_port(self, key: tuple[str, str]) -> int:
        """A free loopback port for the pods of one subdomain, the same for each of them while any of them is here."""
        with self.lock:
            if key not in self.rendezvous_ports:
                taken = set(self.rendezvous_ports.values())
                while True:
                    with socket.socket() as sock:
                        sock.bind((POD_IP, 0))
                        port = sock.getsockname()[1]
                    if port not in taken:
                        break
                self.rendezvous_ports[key] = port
            return self.rendezvous_ports[key]

    # --- nodes

    def node_status(self) -> dict:
        t = rfc3339(now())
        resources = {"cpu": str(self.args.cpus), "memory": self.args.memory, "pods": "1000",
                     "ephemeral-storage": "100Gi", "nvidia.com/gpu": str(self.args.gpus)}
        conditions = [("Ready", "True", "KubeletReady", "speechtune node agent is posting ready status")]
        conditions += [(kind, "False", f"KubeletHasSufficient{kind.replace('Pressure', '')}", "")
                       for kind in ("MemoryPressure", "DiskPressure", "PIDPressure")]
        return {
            "capacity": resources, "allocatable": resources,
            "conditions": [{"type": k, "status": s, "reason": r, "message": m,
                            "lastHeartbeatTime": t, "lastTransitionTime": self.started}
                           for k, s, r, m in conditions],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.args.port}},
            "nodeInfo": {"machineID": "speechtune", "systemUUID": "speechtune", "bootID": "speechtune",
                         "kernelVersion": os.uname().release, "osImage": "speechtune process node",
                         "containerRuntimeVersion": "speechtune-process://1", "kubeletVersion": self.args.version,
                         "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        }

    def register(self) -> None:
        self.started = rfc3339(now())
        for name in self.node_names:
            addresses = [{"type": "InternalIP", "address": POD_IP}, {"type": "Hostname", "address": name}]
            node = {"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": name, "labels": {
                        "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                        "speechtune.dev/node-agent": "true"}},
                    "spec": {}, "status": dict(self.node_status(), addresses=addresses)}
            try:
                created = self.core.create_node(client.V1Node.from_dict(node))
                self.node_uids[name] = created.metadata.uid
            except ApiException as e:
                if e.status != 409:
                    raise
                self.node_uids[name] = self.core.read_node(name).metadata.uid
            self.core.patch_node_status(name, {"status": dict(self.node_status(), addresses=addresses)},
                                        _content_type=SMP)
            log.info("registered node %s (%s GPUs)", name, self.args.gpus)

    def heartbeat(self) -> None:
        """Renews each node's Lease and Ready condition so the node lifecycle controller keeps it schedulable."""
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            for name in self.node_names:
                try:
                    self.renew_lease(name)
                    self.core.patch_node_status(name, {"status": {"conditions": self.node_status()["conditions"]}},
                                                _content_type=SMP)
                except Exception:
                    log.exception("heartbeat for node %s failed", name)

    def renew_lease(self, name: str) -> None:
        spec = {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_time(now())}
        try:
            self.coord.patch_namespaced_lease(name, "kube-node-lease", {"spec": spec}, _content_type=SMP)
        except ApiException as e:
            if e.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": self.node_uids[name]}
            self.coord.create_namespaced_lease("kube-node-lease", client.V1Lease.from_dict({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "ownerReferences": [owner]}, "spec": spec}))

    # --- pods

    def watch_pods(self) -> None:
        """List+watch of pods bound to our nodes; relists whenever the watch breaks or expires."""
        selector = f"spec.nodeName={self.node_names[0]}" if len(self.node_names) == 1 else "spec.nodeName!="
        while not self.stopping.is_set():
            try:
                resp = self.core.list_pod_for_all_namespaces(field_selector=selector, _preload_content=False)
                listing = json.loads(resp.data)
                seen = set()
                for pod in listing["items"]:
                    seen.add(pod["metadata"]["uid"])
                    self.sync(pod)
                with self.lock:
                    vanished = [r for uid, r in self.runners.items() if uid not in seen]
                for runner in vanished:
                    self.forget(runner.pod)
                rv = listing["metadata"]["resourceVersion"]
                while not self.stopping.is_set():
                    resp = self.core.list_pod_for_all_namespaces(
                        field_selector=selector, watch=True, resource_version=rv, allow_watch_bookmarks=True,
                        timeout_seconds=300, _preload_content=False)
                    for line in iter_resp_lines(resp):
                        event = json.loads(line)
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            raise RuntimeError(f"watch error: {obj.get('message')}")
                        rv = obj["metadata"]["resourceVersion"]
                        if event["type"] == "DELETED":
                            self.forget(obj)
                        elif event["type"] in ("ADDED", "MODIFIED"):
                            self.sync(obj)
            except Exception as e:
                if not self.stopping.is_set():
                    log.warning("pod watch broke (%s); relisting", e)
                    time.sleep(1)

    def sync(self, pod: dict) -> None:
        if pod["spec"].get("nodeName") not in self.node_names:
            return
        meta = pod["metadata"]
        with self.lock:
            runner = self.runners.get(meta["uid"])
            if runner is None:
                if pod["status"].get("phase") in ("Succeeded", "Failed") or meta.get("deletionTimestamp"):
                    # Not ours to run (finished before we started, or deleted before it ran).
                    if meta.get("deletionTimestamp") and meta.get("deletionGracePeriodSeconds") != 0:
                        threading.Thread(target=ignore_gone, daemon=True, args=(
                            self.core.delete_namespaced_pod, meta["name"], meta["namespace"]),
                            kwargs={"grace_period_seconds": 0}).start()
                    return
                runner = PodRunner(self, pod)
                self.runners[meta["uid"]] = runner
                self.by_name[runner.key] = runner
                runner.start()
                return
        runner.update(pod)

    def forget(self, pod: dict) -> None:
        with self.lock:
            runner = self.runners.pop(pod["metadata"]["uid"], None)
            if runner is None:
                return
            if self.by_name.get(runner.key) is runner:
                del self.by_name[runner.key]
            if runner.rendezvous and not any(other.rendezvous == runner.rendezvous for other in self.runners.values()):
                self.rendezvous_ports.pop(runner.rendezvous, None)
        runner.kill_now()
        runner.join(timeout=5)
        shutil.rmtree(runner.dir, ignore_errors=True)

    def find(self, namespace: str, name: str) -> PodRunner | None:
        with self.lock:
            return self.by_name.get(f"{namespace}/{name}")

    def config_map(self, namespace: str, ref: dict) -> dict[str, str]:
        try:
            return self.core.read_namespaced_config_map(ref["name"], namespace).data or {}
        except ApiException as e:
            if e.status == 404 and ref.get("optional"):
                return {}
            raise ContainerConfigError(f"configmap {ref['name']!r}: {e.reason}") from e

    def secret(self, namespace: str, ref: dict) -> dict[str, str]:
        try:
            data = self.core.read_namespaced_secret(ref["name"], namespace).data or {}
        except ApiException as e:
            if e.status == 404 and ref.get("optional"):
                return {}
            raise ContainerConfigError(f"secret {ref['name']!r}: {e.reason}") from e
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def shutdown(self, *_) -> None:
        """Stops every pod process: they must not outlive the node they run on."""
        self.stopping.set()
        with self.lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner.kill_now()
        raise SystemExit(0)


class KubeletHandler(http.server.BaseHTTPRequestHandler):
    """The kubelet endpoints the API server uses: /healthz and /containerLogs (client cert required)."""

    agent: NodeAgent

    def log_message(self, fmt, *args):
        log.debug("http %s", fmt % args)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/healthz":
            return self.reply(200, b"ok")
        parts = url.path.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "containerLogs":
            return self.reply(404, f"no such endpoint {url.path}".encode())
        if not self.connection.getpeercert():
            return self.reply(401, b"client certificate required")
        _, namespace, pod, container = parts
        runner = self.agent.find(namespace, pod)
        run = runner.container(container) if runner else None
        if run is None:
            return self.reply(404, f"container {container!r} of pod {namespace}/{pod} is not on this node".encode())
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        attempt = len(run.log_paths) - (2 if query.get("previous") == "true" else 1)
        if attempt < 0:
            which = "previous " if query.get("previous") == "true" else ""
            return self.reply(400, f"container {container!r} has no {which}logs".encode())
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        try:
            self.stream(run, attempt, query)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def stream(self, run: ContainerRun, attempt: int, query: dict) -> None:
        """Writes the log (filtered by sinceTime/sinceSeconds/tailLines/limitBytes), then follows it."""
        since = None
        if "sinceTime" in query:
            since = dt.datetime.fromisoformat(query["sinceTime"].replace("Z", "+00:00"))
        elif "sinceSeconds" in query:
            since = now() - dt.timedelta(seconds=int(query["sinceSeconds"]))
        timestamps = query.get("timestamps") == "true"
        limit = int(query["limitBytes"]) if "limitBytes" in query else None
        follow = query.get("follow") == "true" and attempt == len(run.log_paths) - 1
        sent = 0

        def emit(record: bytes) -> bool:
            nonlocal sent
            stamp, _, text = record.partition(b" ")
            if since and dt.datetime.fromisoformat(stamp.decode().replace("Z", "+00:00")) < since:
                return True
            data = record if timestamps else text
            if limit is not None and sent + len(data) > limit:
                data = data[: limit - sent]
            self.wfile.write(data)
            self.wfile.flush()
            sent += len(data)
            return limit is None or sent < limit

        with open(run.log_paths[attempt], "rb") as f:
            records = f.readlines()
            pending = records.pop() if records and not records[-1].endswith(b"\n") else b""
            if "tailLines" in query:
                records = records[-int(query["tailLines"]):] if int(query["tailLines"]) else []
            for record in records:
                if not emit(record):
                    return
            while follow:
                finished = run.attempt_done.is_set() and len(run.log_paths) - 1 == attempt
                chunk = f.readline()
                if chunk:
                    pending += chunk
                    if pending.endswith(b"\n"):
                        if not emit(pending):
                            return
                        pending = b""
                elif finished:
                    return
                else:
                    time.sleep(0.05)


def serve(agent: NodeAgent) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(agent.args.cert, agent.args.key)
    ctx.load_verify_locations(agent.args.client_ca)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    handler = type("Handler", (KubeletHandler,), {"agent": agent})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", agent.args.port), handler)
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True, name="kubelet-server").start()
    log.info("serving kubelet endpoints on https://127.0.0.1:%d", agent.args.port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--state-dir", required=True, help="pod scratch dirs and container logs")
    parser.add_argument("--repo", required=True, help="repo root; <repo>/.venv/bin goes first on pods' PATH")
    parser.add_argument("--port", type=int, default=16250, help="kubelet endpoint port on 127.0.0.1")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--client-ca", required=True, help="CA of the API server's kubelet client certificate")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--node-prefix", default="speechtune-gpu")
    parser.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu capacity per node")
    parser.add_argument("--cpus", type=int, default=16)
    parser.add_argument("--memory", default="64Gi")
    parser.add_argument("--version", default="v1.37.2", help="kubeletVersion reported in nodeInfo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s: %(message)s")
    agent = NodeAgent(args)
    signal.signal(signal.SIGTERM, agent.shutdown)
    signal.signal(signal.SIGINT, agent.shutdown)
    (agent.state_dir / "pods").mkdir(parents=True, exist_ok=True)
    serve(agent)
    agent.register()
    threading.Thread(target=agent.heartbeat, daemon=True, name="heartbeat").start()
    for name in agent.node_names:
        agent.renew_lease(name)
    agent.watch_pods()


if __name__ == "__main__":
    main()
