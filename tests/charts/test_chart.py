"""charts/speechtune: what helm lint and helm template say, what the real API server accepts, and
that the operator runs a study with exactly the RBAC the chart grants, no rule more."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
import uuid

import pytest
import yaml

from tests.charts.helm import CHART, CI_VALUES, REPO, helm, operator_process, render, servicemonitor_crd, token_kubeconfig
from tests.speechtune.k8s.helpers import free_port, get_json, small_study, stop_operator, study_status

# --- static: no cluster


def test_chart_lints_clean_against_its_schema():
    for values in CI_VALUES:
        out = helm("lint", str(CHART), "--strict", "-f", str(values))
        assert "0 chart(s) failed" in out.stdout, out.stdout


@pytest.mark.parametrize(("setting", "named"), [
    ("replicas=2", "/replicas"),
    ("storage.existingSecret.nam=db", "nam"),
    ("metrics.port=0", "/metrics/port"),
    ("watchNamespaces[0]=Team_A", "/watchNamespaces/0"),
    ("metrics.serviceMonitor.interval=soon", "/metrics/serviceMonitor/interval"),
    ("storage.allowStudyUrls.schemes={sqlite}", "/storage/allowStudyUrls/schemes/0"),
    ("storage.allowStudyUrls.hosts={db.example.svc/x}", "/storage/allowStudyUrls/hosts/0"),
])
def test_schema_rejects_bad_values_naming_them(setting, named):
    out = helm("template", "speechtune", str(CHART), "--set", setting, check=False)
    assert out.returncode != 0 and named in out.stderr, out.stderr


def test_network_policy_without_watched_namespaces_is_refused_with_the_reason():
    out = helm("template", "speechtune", str(CHART), "--set", "networkPolicy.enabled=true", check=False)
    assert out.returncode != 0 and "networkPolicy.enabled needs watchNamespaces" in out.stderr, out.stderr


def test_chart_crds_are_the_top_level_crd_files():
    shown = [doc for doc in yaml.safe_load_all(helm("show", "crds", str(CHART)).stdout) if doc]
    files = [yaml.safe_load(path.read_text()) for path in sorted((REPO / "crds").glob("*.yaml"))]
    assert sorted(shown, key=lambda doc: doc["metadata"]["name"]) == sorted(files, key=lambda doc: doc["metadata"]["name"])


def test_watch_scope_selects_cluster_role_or_one_role_per_namespace():
    cluster_wide = {doc["kind"] for doc in render()}
    assert {"ClusterRole", "ClusterRoleBinding"} <= cluster_wide and "Role" not in cluster_wide
    namespaced = render("--set", "watchNamespaces={team-a,team-b}")
    assert not {"ClusterRole", "ClusterRoleBinding"} & {doc["kind"] for doc in namespaced}
    for kind in ("Role", "RoleBinding"):
        assert sorted(doc["metadata"]["namespace"] for doc in namespaced if doc["kind"] == kind) == ["team-a", "team-b"]
    deployment = next(doc for doc in namespaced if doc["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args


def test_trial_service_account_has_no_token_and_no_rules():
    docs = render("--set", "watchNamespaces={team-a}")
    account = next(doc for doc in docs if doc["kind"] == "ServiceAccount" and doc["metadata"]["namespace"] == "team-a")
    assert account["automountServiceAccountToken"] is False
    bound = [subject["name"] for doc in docs if doc["kind"] in ("RoleBinding", "ClusterRoleBinding")
             for subject in doc["subjects"]]
    assert account["metadata"]["name"] not in bound


def test_bundled_postgresql_password_is_generated_and_feeds_the_operator_url():
    docs = render("--set", "postgresql.enabled=true")
    secret = next(doc for doc in docs if doc["kind"] == "Secret")
    password = secret["stringData"]["password"]
    assert len(password) == 32 and f":{password}@" in secret["stringData"]["url"]
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    env = {item["name"]: item for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SPEECHTUNE_STORAGE_URL"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "url"}
    assert next(doc for doc in docs if doc["kind"] == "StatefulSet")["spec"]["volumeClaimTemplates"]


def test_study_urls_are_off_by_default_and_the_allow_list_reaches_the_operator():
    def env(*args: str) -> dict:
        deployment = next(doc for doc in render(*args) if doc["kind"] == "Deployment")
        return {item["name"]: item.get("value") for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}

    assert not {"SPEECHTUNE_STUDY_URL_SCHEMES", "SPEECHTUNE_STUDY_URL_HOSTS"} & set(env())
    allowed = env("--set", "storage.allowStudyUrls.schemes={postgresql,postgresql+psycopg2}",
                  "--set", "storage.allowStudyUrls.hosts={db.example.svc,10.0.0.5:5432}")
    assert allowed["SPEECHTUNE_STUDY_URL_SCHEMES"] == "postgresql,postgresql+psycopg2"
    assert allowed["SPEECHTUNE_STUDY_URL_HOSTS"] == "db.example.svc,10.0.0.5:5432"


def test_notes_tell_how_a_secret_opts_in_and_which_study_urls_are_allowed():
    def notes(*args: str) -> str:
        return helm("install", "speechtune", str(CHART), "--dry-run=client", *args).stdout.split("NOTES:", 1)[1]

    default = notes()
    assert "kubectl -n NAMESPACE label secret study-db speechtune.io/storage=true" in default
    assert "spec.storage.url / spec.warmStart.storage.url are off" in default and "SQLite is refused" in default
    allowed = notes("--set", "storage.allowStudyUrls.hosts={db.example.svc}")
    assert "may name only postgresql+psycopg on db.example.svc" in allowed


def test_every_value_is_in_the_schema_with_a_description():
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(properties: dict, values: dict, prefix: str) -> None:
        assert set(values) <= set(properties), f"{prefix}: values without a schema: {set(values) - set(properties)}"
        for name, prop in properties.items():
            assert prop.get("description"), f"{prefix}{name} has no description"
            if "properties" in prop and isinstance(values.get(name), dict):
                walk(prop["properties"], values[name], f"{prefix}{name}.")

    walk(schema["properties"], defaults, "")


def test_readme_values_table_is_generated_from_the_schema():
    table = subprocess.run([REPO / "bin" / "chart-values-table"], capture_output=True, text=True, check=True).stdout
    readme = (REPO / "README.md").read_text()
    assert table.strip() in readme, "README's values table is stale: run bin/chart-values-table --write"


def test_images_are_what_the_chart_and_examples_reference():
    deployment = next(doc for doc in render() if doc["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    dockerfile = (REPO / "Dockerfile").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert f"docker build -t {values['image']['repository']} ." in dockerfile
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.MULTILINE).group(1))
    assert pod["containers"][0]["command"] == entrypoint
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE).groups()
    assert (str(pod["securityContext"]["runAsUser"]), str(pod["securityContext"]["runAsGroup"])) == user
    assert re.search(r"^EXPOSE (\d+) (\d+)$", dockerfile, re.MULTILINE).groups() == (
        str(values["metrics"]["port"]), str(values["healthPort"]))
    trainer = (REPO / "trainer_image" / "Dockerfile").read_text()
    image = re.search(r"docker build -f trainer_image/Dockerfile -t (\S+) \.", trainer).group(1)
    example = yaml.safe_load((REPO / "examples" / "k8s" / "fake-study.yaml").read_text())
    assert example["spec"]["trialTemplate"]["image"] == f"{image}:{values_app_version()}"


def install_steps(dockerfile: str) -> list[str]:
    """The package-installing commands of a Dockerfile's RUN lines."""
    runs = re.findall(r"^RUN ((?:.*\\\n)*.*)$", dockerfile, re.MULTILINE)
    commands = [part.strip() for run in runs for part in run.replace("\\\n", " ").split("&&")]
    return [re.sub(r"\s+", " ", command) for command in commands if re.match(r"(apt-get install|pip install)", command)]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "trainer_image/Dockerfile"])
def test_dockerfile_install_steps_are_the_readme_commands(dockerfile):
    steps = install_steps((REPO / dockerfile).read_text())
    assert steps, f"{dockerfile} installs nothing?"
    readme = (REPO / "README.md").read_text()
    for step in steps:
        assert step in readme, f"{dockerfile} runs `{step}`, which README.md does not show"
    setup = (REPO / "bin" / "setup").read_text()
    apt = next((step for step in steps if step.startswith("apt-get install")), None)
    if apt:
        packages = re.search(r"^packages=\((.*)\)$", setup, re.MULTILINE).group(1).split()
        assert set(apt.split()[2:]) - {"-y", "--no-install-recommends"} <= set(packages)


def values_app_version() -> str:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


# --- the real control plane


@pytest.fixture(scope="module")
def monitoring_crd(crds):
    crds.kubectl("apply", "--server-side", "-f", str(servicemonitor_crd()))
    crds.kubectl("wait", "--for=condition=Established", "crd/servicemonitors.monitoring.coreos.com", "--timeout=30s")
    return crds


def ensure_namespace(cluster, name: str, restricted: bool = True) -> None:
    labels = {"pod-security.kubernetes.io/enforce": "restricted"} if restricted else {}
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(body))


@pytest.mark.cluster
@pytest.mark.parametrize("values", CI_VALUES, ids=[path.stem for path in CI_VALUES])
def test_renders_pass_server_side_dry_run_without_pod_security_warnings(monitoring_crd, kube_namespace, values):
    cluster = monitoring_crd
    cluster.kubectl("label", "namespace", kube_namespace, "pod-security.kubernetes.io/enforce=restricted")
    for namespace in yaml.safe_load(values.read_text()).get("watchNamespaces", []):
        ensure_namespace(cluster, namespace)
    text = helm("template", "speechtune", str(CHART), "-n", kube_namespace, "--include-crds", "-f", str(values),
                env=cluster.env).stdout
    out = cluster.kubectl("apply", "--server-side", "--force-conflicts", "--dry-run=server", "-f", "-", input=text)
    kinds = {doc["kind"] for doc in yaml.safe_load_all(text) if doc}
    assert len([line for line in out.stdout.splitlines() if "(server dry run)" in line]) >= len(kinds)
    assert "PodSecurity" not in out.stderr, out.stderr


def run_study(cluster, namespace: str, name: str, operator_log, timeout: float, pods_seen: dict | None = None,
              several_pods: bool = False) -> tuple[dict, str]:
    """Apply a small study that touches every permission (Secret storage URL, warm worker pods with
    their token Secrets, a promotion up a two-level ladder, trials kept to one, Events) and wait until
    it ends or the operator logs a refusal; the status and the log. ``pods_seen`` collects the study's
    pods while it runs (worker pods go with the study's end). ``several_pods``: a second study, ``<name>-pods``,
    runs a trial of 2 pods (its headless Service) alongside, and is waited for too."""
    ladder = {"levels": [{"name": "low", "overrides": {"epochs": 1}}, {"name": "high", "overrides": {"epochs": 3}}],
              "reductionFactor": 2, "initialTrials": 2}
    body = small_study(name, ["--sleep", "0.1"], parallelism=2, fidelity=ladder, retention={"keepTrials": 1},
                       storage={"secretRef": {"name": "study-db", "key": "url"}})
    body["spec"]["trialTemplate"]["workers"] = {"mode": "warm", "stopGraceSeconds": 5}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))
    if several_pods:
        pair = small_study(f"{name}-pods", ["--epochs", "1"], storage={"secretRef": {"name": "study-db", "key": "url"}})
        pair["spec"]["trialTemplate"]["replicas"] = 2
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pair))
    deadline = time.monotonic() + timeout
    while True:
        log = operator_log.read_text() if operator_log.exists() else ""
        status = study_status(cluster, namespace, name)
        if several_pods and study_status(cluster, namespace, f"{name}-pods").get("state") not in ("Succeeded", "Failed"):
            status = {**status, "state": None}  # not done until both are
        if pods_seen is not None:
            pods_seen.update((pod["metadata"]["name"], pod) for pod in
                             get_json(cluster, "pods", "-n", namespace, "-l", f"speechtune.io/study={name}")["items"])
        if status.get("state") in ("Succeeded", "Failed") or "forbidden" in log.lower() or time.monotonic() > deadline:
            time.sleep(1 if status.get("state") == "Succeeded" else 0)  # let the last Events and patches land
            return status, operator_log.read_text() if operator_log.exists() else ""
        time.sleep(0.5)


def remove_studies(cluster, namespace: str) -> None:
    """Drop the studies without an operator to release them: their finalizers are cleared first."""
    for item in get_json(cluster, "speechtuningstudies", "-n", namespace)["items"]:
        cluster.kubectl("patch", "speechtuningstudy", item["metadata"]["name"], "-n", namespace, "--type=merge",
                        "-p", '{"metadata":{"finalizers":null}}')
    cluster.kubectl("delete", "speechtuningstudies", "--all", "-n", namespace, "--timeout=60s")


@pytest.fixture(params=["namespaced", "cluster-wide"])
def installed(request, crds, kube_namespace, postgres_url, tmp_path):
    """The chart installed into a restricted namespace; the studies go to a second restricted
    namespace (watched by name, or as one of all) that holds their database Secret. The
    Deployment has 0 replicas, because the test cluster's kubelet mounts no ServiceAccount
    token: the tests start its container themselves, with a token of its ServiceAccount."""
    cluster = crds
    team = f"team-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("label", "namespace", kube_namespace, "pod-security.kubernetes.io/enforce=restricted")
    ensure_namespace(cluster, team)
    cluster.kubectl("create", "secret", "generic", "study-db", "-n", team, f"--from-literal=url={postgres_url}")
    cluster.kubectl("label", "secret", "study-db", "-n", team, "speechtune.io/storage=true")  # it opts in
    release = f"st-{team}"  # cluster-wide, its ClusterRole's name must not collide with another run's
    scope = ["--set", f"watchNamespaces={{{team}}}"] if request.param == "namespaced" else []
    helm("install", release, str(CHART), "-n", kube_namespace, *scope, "--set", "replicas=0",
         "--set", f"metrics.port={free_port()}", "--set", f"healthPort={free_port()}",
         "--set", f"workerDispatch.port={free_port()}", "--force-conflicts",
         "--wait", "--timeout=60s", env=cluster.env)
    deployment = get_json(cluster, "deployment", f"{release}-speechtune", "-n", kube_namespace)
    kubeconfig = token_kubeconfig(cluster, f"{release}-speechtune", kube_namespace, tmp_path / "operator.kubeconfig")
    try:
        yield cluster, team, deployment, kubeconfig
    finally:
        remove_studies(cluster, team)
        helm("uninstall", release, "-n", kube_namespace, env=cluster.env, check=False)
        cluster.kubectl("delete", "namespace", team, "--wait=false", check=False)


@pytest.mark.cluster
def test_helm_install_runs_a_study_with_only_the_charts_rbac(installed, tmp_path):
    cluster, team, deployment, kubeconfig = installed
    log = tmp_path / "operator.log"
    operator = operator_process(cluster, deployment, kubeconfig, log)
    try:
        seen: dict = {}
        status, text = run_study(cluster, team, "charted", log, timeout=90, pods_seen=seen)
        pods = list(seen.values())
        trials = get_json(cluster, "speechtuningtrials", "-n", team)["items"]
        reasons = {event["reason"] for event in get_json(cluster, "events", "-n", team)["items"]}
        # The study's result first, then its workers retire: their Jobs and token Secrets go within seconds.
        deadline = time.monotonic() + 30
        while (tokens := get_json(cluster, "secrets", "-n", team, "-l", "speechtune.io/worker")["items"]) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stop_operator(operator)
    assert status.get("state") == "Succeeded", (status, text[-3000:])
    assert pods and all("-worker-" in pod["metadata"]["name"] for pod in pods), "the trials ran in warm worker pods"
    assert not tokens, "a worker's token Secret outlived the study"
    assert "forbidden" not in text.lower() and "permission" not in text.lower(), text[-3000:]
    assert status["trials"]["complete"] == 1 and status["trials"]["pruned"] == 1, status  # one promoted, one stopped
    assert len(trials) == 1  # spec.retention.keepTrials
    assert {"TrialStarted", "TrialPromoted", "StudySucceeded"} <= reasons, reasons
    url = base64.b64decode(get_json(cluster, "secret", "study-db", "-n", team)["data"]["url"]).decode()
    cluster_wide = "--all-namespaces" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    account = "default" if cluster_wide else "speechtune-trial"  # the chart creates it in watched namespaces only
    for pod in pods:
        assert pod["spec"]["serviceAccountName"] == account
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert url not in json.dumps(pod["spec"]), "a trial pod was given the database URL"


@pytest.mark.cluster
@pytest.mark.parametrize("installed", ["namespaced"], indirect=True)
def test_every_rule_of_the_charts_role_is_needed(installed, tmp_path):
    """Each rule removed in turn: the operator, otherwise unchanged, is refused something, and
    says so in its log or in the study's status."""
    cluster, team, deployment, kubeconfig = installed
    name = deployment["metadata"]["name"]
    rules = get_json(cluster, "role", name, "-n", team)["rules"]
    unneeded = []
    for index, rule in enumerate(rules):
        reduced = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                   "metadata": {"name": name, "namespace": team},
                   "rules": rules[:index] + rules[index + 1:]}
        cluster.kubectl("replace", "-f", "-", input=json.dumps(reduced))
        log = tmp_path / f"operator-{index}.log"
        operator = operator_process(cluster, deployment, kubeconfig, log)
        try:
            status, text = run_study(cluster, team, f"without-rule-{index}", log, timeout=60, several_pods=True)
        finally:
            stop_operator(operator)
            remove_studies(cluster, team)
        # The refusal must show where an operator's user looks: its log or the study's status.
        if "forbidden" not in (text + json.dumps(status)).lower():
            unneeded.append((rule, status.get("state")))
    assert not unneeded, f"nothing is refused without these rules: {unneeded}"


@pytest.mark.cluster
@pytest.mark.parametrize("installed", ["namespaced"], indirect=True)
def test_a_staged_study_warm_started_by_name_runs_with_only_the_charts_rbac(installed, tmp_path):
    """What stages and warm start add: the source SpeechTuningStudy read by name, its storage's Secret
    (spec.warmStart.storage.secretRef), the stage Events the runner posts itself."""
    cluster, team, deployment, kubeconfig = installed
    log = tmp_path / "operator.log"
    db = {"secretRef": {"name": "study-db", "key": "url"}}
    source = small_study("source", ["--epochs", "2", "--sleep", "0.1"], maxTrials=2, parallelism=2, storage=db)
    staged = small_study("staged", ["--epochs", "2", "--sleep", "0.1"], parallelism=2, storage=db,
                         stages=[{"name": "baseline", "kind": "baseline"}, {"name": "search", "kind": "search", "maxTrials": 2},
                                 {"name": "check", "kind": "validate", "seeds": 1}],
                         warmStart={"study": "source", "topK": 1, "storage": db})
    operator = operator_process(cluster, deployment, kubeconfig, log)
    try:
        for body in (source, staged):  # together: the staged study waits for its source to end
            cluster.kubectl("apply", "-n", team, "-f", "-", input=json.dumps(body))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "forbidden" not in (log.read_text() if log.exists() else "").lower():
            status = study_status(cluster, team, "staged")
            if status.get("state") in ("Succeeded", "Failed"):
                break
            time.sleep(0.5)
        time.sleep(1)  # the last Events
        reasons = {event["reason"] for event in get_json(cluster, "events", "-n", team, "--field-selector",
                                                         "involvedObject.name=staged")["items"]}
    finally:
        stop_operator(operator)
    text = log.read_text()
    assert status.get("state") == "Succeeded", (status, text[-3000:])
    assert "forbidden" not in text.lower(), text[-3000:]
    assert [(stage["name"], stage["state"]) for stage in status["stages"]] == [
        ("baseline", "Succeeded"), ("search", "Succeeded"), ("check", "Succeeded")]
    assert {"StageStarted", "StageFinished", "WarmStarted", "StudySucceeded"} <= reasons, reasons
