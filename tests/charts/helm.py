"""The chart under test, the real helm binary, and the operator run as the chart's Deployment says."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.cluster.plugin import tools_env

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "speechtune"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
# The Prometheus Operator's own ServiceMonitor CRD, from its Go module (the Go module proxy is a registry).
PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.90.1"


def helm(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = env or tools_env()
    proc = subprocess.run([shutil.which("helm", path=env["PATH"]), *args], env=env, capture_output=True, text=True,
                          timeout=120)
    if check and proc.returncode:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def render(*args: str, env: dict[str, str] | None = None) -> list[dict]:
    """`helm template` of the chart, as parsed objects (empty documents dropped)."""
    text = helm("template", "speechtune", str(CHART), *args, env=env).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def servicemonitor_crd() -> Path:
    """The ServiceMonitor CRD file of the real Prometheus Operator release."""
    out = subprocess.run(["go", "mod", "download", "-json", PROMETHEUS_OPERATOR], capture_output=True, text=True,
                         timeout=300, cwd=REPO / "tests" / "cluster")
    info = json.loads(out.stdout or "{}")
    if out.returncode or "Dir" not in info:
        raise AssertionError(f"go mod download {PROMETHEUS_OPERATOR} failed: {info.get('Error') or out.stderr}")
    return Path(info["Dir"]) / "example" / "prometheus-operator-crd" / "monitoring.coreos.com_servicemonitors.yaml"


def operator_process(cluster, deployment: dict, kubeconfig: str, log_path: Path) -> subprocess.Popen:
    """Start the operator container of ``deployment`` as a local process, as a kubelet would run it:
    its command, args and env (Secret references resolved), but with the given kubeconfig's
    credentials and every listener on loopback."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    namespace = deployment["metadata"]["namespace"]
    env = {key: value for key, value in cluster.env.items() if not key.startswith("SPEECHTUNE_")}
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            secret = json.loads(cluster.kubectl("get", "secret", ref["name"], "-n", namespace, "-o", "json").stdout)
            env[variable["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    env.update(KUBECONFIG=kubeconfig, SPEECHTUNE_METRICS_ADDRESS="127.0.0.1")
    if "SPEECHTUNE_DISPATCH_PORT" in env:  # no Service network here: worker pods reach the operator on loopback
        env.update(SPEECHTUNE_DISPATCH_ADDRESS="127.0.0.1", SPEECHTUNE_DISPATCH_URL=f"http://127.0.0.1:{env['SPEECHTUNE_DISPATCH_PORT']}")
    argv = [re.sub(r"//0\.0\.0\.0:", "//127.0.0.1:", arg) for arg in container["command"] + container.get("args", [])]
    assert argv[0] == "python", argv
    return subprocess.Popen([sys.executable, *argv[1:]], env=env, cwd=REPO, stdout=open(log_path, "ab"),
                            stderr=subprocess.STDOUT)


def token_kubeconfig(cluster, service_account: str, namespace: str, path: Path) -> str:
    """A kubeconfig that authenticates as ``service_account``, with a TokenRequest token."""
    token = cluster.kubectl("create", "token", service_account, "-n", namespace, "--duration=1h").stdout.strip()
    config = yaml.safe_load(open(cluster.kubeconfig))
    config["users"] = [{"name": service_account, "user": {"token": token}}]
    config["contexts"] = [{"name": service_account,
                           "context": {"cluster": config["clusters"][0]["name"], "user": service_account}}]
    config["current-context"] = service_account
    path.write_text(yaml.safe_dump(config))
    return str(path)

