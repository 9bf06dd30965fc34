"""The Grafana dashboard (charts/speechtune/dashboards/speechtune.json) asks only for what speechtune exports,
and every panel gets data from a real Prometheus scraping the real operator during real studies."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from speechtune import metrics
from speechtune.k8s import metrics as operator_metrics
from tests.speechtune.k8s.helpers import (
    REPO, delete_studies, free_port, small_study, stop_operator, study_status, wait_until,
)
from tests.support.prometheus import prometheus_server

DASHBOARD = REPO / "charts" / "speechtune" / "dashboards" / "speechtune.json"
LADDER = REPO / "examples" / "k8s" / "fake-ladder.yaml"
STAGED = REPO / "examples" / "k8s" / "staged-study.yaml"
JOB = "speechtune-operator"
# What Grafana puts in for its built-in variables, at a 1 s scrape interval and a 5 min range.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
METRIC = re.compile(r"\b(speechtune_\w+|up)\b")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel."""
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"] for target in panel["targets"]]


def variables() -> dict[str, dict]:
    return {variable["name"]: variable for variable in dashboard()["templating"]["list"]}


def grafana_regex(values: list[str]) -> str:
    """A multi-value variable as Grafana's Prometheus data source writes it into a query: an escaped alternation."""
    return "(" + "|".join(re.sub(r"([\\$^*{}\[\]'+?.()|])", r"\\\\\1", value) for value in values) + ")"


def render(expr: str, values: dict[str, str]) -> str:
    """``expr`` with $name, ${name} and Grafana's built-ins replaced; an unknown variable fails the test."""
    values = {**BUILTINS, **values}

    def value(match: re.Match) -> str:
        assert match.group(1) in values, f"{expr}: no value for ${match.group(1)}"
        return values[match.group(1)]

    return re.sub(r"\$\{?(\w+)\}?", value, expr)


def exported() -> dict[str, set[str]]:
    """Every series name speechtune's code exports (as prometheus_client names them) → its labels."""
    names: dict[str, set[str]] = {"up": {"job", "instance"}}
    for module in (metrics, operator_metrics):
        for metric in vars(module).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            labels = set(metric._labelnames) | {"job", "instance"}
            family = metric.describe()[0]
            suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}[family.type]
            for suffix in suffixes:
                names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def test_dashboard_is_grafana_json_with_datasource_job_namespace_and_study_variables():
    board = dashboard()
    assert board["schemaVersion"] >= 39 and board["uid"] == "speechtune"
    assert set(variables()) == {"datasource", "job", "namespace", "study"}
    assert variables()["datasource"]["query"] == "prometheus"
    for name in ("namespace", "study"):
        assert variables()[name]["query"].startswith("label_values(speechtune_")
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))


def test_every_panel_queries_the_datasource_variable_with_an_expression():
    for panel in dashboard()["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_every_metric_and_label_in_the_dashboard_is_one_speechtune_exports():
    known = exported()
    queries = [(panel["title"], target["expr"], target.get("legendFormat", ""))
               for panel in dashboard()["panels"] for target in panel["targets"]]
    queries += [(name, variable["query"], "") for name, variable in variables().items() if name != "datasource"]
    for title, expr, legend in queries:
        used = METRIC.findall(expr)
        assert used, f"{title}: {expr} reads no metric"
        for name in used:
            assert name in known, f"{title}: {name} is not exported; speechtune exports {sorted(known)}"
        labels = {label for matchers in re.findall(r"\{([^}]*)\}", expr) for label in re.findall(r"(\w+)\s*[=!]~?", matchers)}
        labels |= {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr) for label in group.split(",")}
        labels |= set(re.findall(r"\{\{(\w+)\}\}", legend))
        labels |= set(re.findall(r"label_values\(.*, (\w+)\)$", expr))
        for name in used:
            assert labels <= known[name], f"{title}: {expr} uses labels {labels - known[name]} that {name} lacks"


def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses every query as Prometheus will, once Grafana has filled in the variables."""
    values = {"datasource": "prometheus", "job": JOB, "namespace": "team-a", "study": grafana_regex(["team-a.asr.0a1b2c3d"])}
    rules = [{"record": f"panel:{index}", "expr": render(expr, values)} for index, (_, expr) in enumerate(targets())]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def gpu_study() -> dict:
    """Trials that each request one GPU (the test cluster's node has 8), with a pruner that prunes."""
    body = small_study("gpu-digits", ["--epochs", "9", "--sleep", "0.2"], maxTrials=8, parallelism=2, maxFailedTrials=3,
                       pruner={"type": "median", "startupTrials": 2})
    body["spec"]["trialTemplate"]["resources"]["limits"]["nvidia.com/gpu"] = 1
    return body


def warm_gpu_study() -> dict:
    """Warm worker pods with a GPU each, whose trainer also prints a line for a run it was not given:
    the idle-capacity and ignored-line series."""
    body = small_study("warm-gpu", ["--epochs", "4", "--sleep", "0.2", "--forge", "trial-0@warm-gpu-worker-9#1"], maxTrials=6,
                       parallelism=2, maxFailedTrials=3, pruner={"type": "none"})
    body["spec"]["trialTemplate"]["resources"]["limits"]["nvidia.com/gpu"] = 1
    body["spec"]["trialTemplate"]["workers"] = {"mode": "warm", "stopGraceSeconds": 5}
    return body


def staged_study() -> dict:
    """examples/k8s/staged-study.yaml with smaller stages: every stage panel gets its series (a stage's trials
    finishing, its best value, which stage runs) without slowing the other two studies down much."""
    body = yaml.safe_load(STAGED.read_text())
    body["spec"]["parallelism"] = 2
    for stage in body["spec"]["stages"]:
        if "maxTrials" in stage:
            stage["maxTrials"] = 4
    stage = body["spec"]["stages"][2]
    stage["sampler"]["startupTrials"], stage["pruner"]["startupTrials"] = 2, 2
    return body


def resolve_variables(prom, namespace: str) -> dict[str, str]:
    """The query variables as Grafana resolves them (label_values through the HTTP API), with our namespace
    picked and every study selected; empty until Prometheus has seen the studies."""
    values = {"datasource": "prometheus"}
    for name in ("job", "namespace", "study"):
        selector, label = re.fullmatch(r"label_values\((.*), (\w+)\)", variables()[name]["query"]).groups()
        found = prom.label_values(label, render(selector, values))
        chosen = {"job": [JOB], "namespace": [namespace]}.get(name, found)
        if not found or not set(chosen) <= set(found):
            return {}
        values[name] = grafana_regex(chosen)
    return values


def shows_data(expr: str, result: list[dict]) -> bool:
    """A series with a number to draw; for a rate or increase, one above 0 (a counter that never
    moves, or whose increase Prometheus cannot see, would pass a mere "a series exists")."""
    numbers = [float(series["value"][1]) for series in result]
    return any(math.isfinite(n) and (n > 0 or not re.search(r"\b(rate|increase)\(", expr)) for n in numbers)


def sample(prom, promql: str) -> float:
    result = prom.query(promql)
    assert len(result) == 1, (promql, result)
    return float(result[0]["value"][1])


@pytest.mark.cluster
def test_every_panel_gets_data_from_prometheus_scraping_the_operator_during_a_gpu_study_a_ladder_stages_and_warm_workers(
        crds, kube_namespace, postgres_url, tmp_path):
    cluster = crds
    port, dispatch = free_port(), free_port()
    log = tmp_path / "operator.log"
    studies = [gpu_study(), yaml.safe_load(LADDER.read_text()), staged_study(), warm_gpu_study()]
    with prometheus_server([f"127.0.0.1:{port}"], job=JOB) as prom:
        operator = subprocess.Popen(
            [sys.executable, "-m", "speechtune.k8s", "-n", kube_namespace, f"--liveness=http://127.0.0.1:{free_port()}/healthz"],
            env=dict(cluster.env, SPEECHTUNE_STORAGE_URL=postgres_url, SPEECHTUNE_METRICS_PORT=str(port),
                     SPEECHTUNE_DISPATCH_PORT=str(dispatch), SPEECHTUNE_DISPATCH_URL=f"http://127.0.0.1:{dispatch}"), cwd=REPO,
            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        try:
            for body in studies:
                cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
            optuna_names = [wait_until(lambda: study_status(cluster, kube_namespace, body["metadata"]["name"]).get("optunaStudy"),
                                       timeout=30, what="the study's Optuna name") for body in studies]
            without_data = {expr: title for title, expr in targets()}
            deadline = time.monotonic() + 150
            while without_data and time.monotonic() < deadline:
                values = resolve_variables(prom, kube_namespace)
                for expr in list(without_data) if values else []:
                    if shows_data(expr, prom.query(render(expr, values))):
                        del without_data[expr]
                time.sleep(1)
            for body in studies:
                wait_until(lambda: study_status(cluster, kube_namespace, body["metadata"]["name"]).get("state") == "Succeeded",
                           timeout=120, what=f"study {body['metadata']['name']} to succeed")
            gpu_name, ladder_name, staged_name, _ = optuna_names
            wait_until(lambda: prom.query(f'sum(speechtune_trials_finished_total{{study="{gpu_name}"}}) == 8'),
                       timeout=10, what="Prometheus to scrape the GPU study's last trial")
            gpu_seconds = sample(prom, f'speechtune_gpu_seconds_total{{study="{gpu_name}"}}')
            run_seconds = sample(prom, f'sum(speechtune_trial_duration_seconds_sum{{study="{gpu_name}"}})')
            ladder_gpu_seconds = sample(prom, f'speechtune_gpu_seconds_total{{study="{ladder_name}"}}')
            wait_until(lambda: prom.query(f'sum(speechtune_trials_finished_total{{study="{staged_name}"}}) == 2 + 4 + 4'),
                       timeout=10, what="Prometheus to scrape the staged study's last trial")
            by_stage = {series["metric"]["stage"]: float(series["value"][1]) for series in prom.query(
                f'sum by (stage) (speechtune_trials_finished_total{{study="{staged_name}"}})')}
            wait_until(lambda: prom.query(f'speechtune_stage_best_value{{study="{staged_name}", stage="validate"}}'),
                       timeout=10, what="Prometheus to scrape the validate stage's mean")
            best_by_stage = {series["metric"]["stage"] for series in prom.query(f'speechtune_stage_best_value{{study="{staged_name}"}}')}
            plain_stages = {series["metric"].get("stage", "") for series in prom.query(
                f'speechtune_trials_finished_total{{study=~"{gpu_name}|{ladder_name}"}}')}
        finally:
            delete_studies(cluster, kube_namespace)
            stop_operator(operator)
    assert not without_data, "panels without data:\n" + "\n".join(f"{title}: {expr}" for expr, title in without_data.items()) \
        + "\noperator log:\n" + log.read_text()[-3000:]
    assert 0.5 * run_seconds <= gpu_seconds <= run_seconds, (gpu_seconds, run_seconds)  # 1 GPU x each trial's run time
    assert ladder_gpu_seconds == 0  # its trials request no GPU
    assert by_stage == {"baseline": 2, "coarse": 4, "fine": 4, "validate": 0}  # a validate stage reruns a trial: it finishes none
    assert best_by_stage == {"baseline", "coarse", "fine", "validate"}
    assert plain_stages == {""}  # without stages the label is empty, so sums over the other labels are unchanged
