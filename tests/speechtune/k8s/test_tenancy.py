"""The operator is no confused deputy (issue 14, item 9): whoever may create a study cannot make it read a
Secret that did not opt in, show a Secret's value, probe the network through spec.storage.url, or write
SQLite files in the operator's filesystem; connection errors reach status only as "cannot connect".

First the pure parts (no cluster), then the real control plane, with the study's author impersonated as a
user who may create and read studies and their Events, and nothing on Secrets."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import types
import urllib.parse

import optuna
import pytest
import yaml

from speechtune import spec
from speechtune.k8s import runner
from speechtune.k8s.runner import StorageProblem, checked_url, open_storage, status_text, storage_url, warm_start_url
from speechtune.storage import StorageUnavailable
from tests.speechtune.k8s.helpers import (
    STUDY_URL_ALLOW_LIST, free_port, operator_running, small_study, study_status, wait_for_study_end, wait_until,
)

SECRET_VALUE = "s3cr3t-API-KEY-123"  # what a Secret that is no database URL holds: it must never show
PASSWORD = "hunter2-pw-XYZ"


class FakeApi:
    """Api.get over a dict of Secrets by name."""

    def __init__(self, secrets: dict[str, dict]):
        self.secrets = secrets

    async def get(self, path: str) -> dict | None:
        return self.secrets.get(path.rsplit("/", 1)[-1])


def secret(value: str | bytes, opted_in: bool = True, key: str = "url") -> dict:
    raw = value if isinstance(value, bytes) else value.encode()
    labels = {runner.STORAGE_LABEL: "true"} if opted_in else {"app": "other"}
    return {"metadata": {"labels": labels}, "data": {key: base64.b64encode(raw).decode()}}


def problem(api: FakeApi, storage: spec.Storage, field: str = "spec.storage") -> StorageProblem:
    with pytest.raises(StorageProblem) as caught:
        asyncio.run(storage_url(api, "team", storage, field))
    return caught.value


@pytest.fixture
def allow_list(monkeypatch):
    """The allow-list the chart sets from storage.allowStudyUrls."""
    monkeypatch.setenv(runner.STUDY_URL_SCHEMES_ENV, "postgresql+psycopg, postgresql")
    monkeypatch.setenv(runner.STUDY_URL_HOSTS_ENV, "db.team.svc,Other.DB:6543")


@pytest.fixture
def no_allow_list(monkeypatch):
    monkeypatch.delenv(runner.STUDY_URL_SCHEMES_ENV, raising=False)
    monkeypatch.delenv(runner.STUDY_URL_HOSTS_ENV, raising=False)


# --- Secrets: only those that opt in, and never their value


def test_a_secret_without_the_opt_in_label_is_not_used_and_its_value_not_shown(no_allow_list):
    api = FakeApi({"api-keys": secret(SECRET_VALUE, opted_in=False)})
    found = problem(api, spec.Storage(secret_name="api-keys", secret_key="url"))
    assert found.reason == "SecretNotOptedIn" and found.field == "spec.storage.secretRef.name"
    assert "'api-keys'" in str(found) and 'speechtune.io/storage="true"' in str(found)
    assert SECRET_VALUE not in str(found)


def test_an_opted_in_secret_that_is_no_database_url_is_refused_without_its_value(no_allow_list):
    for value in (SECRET_VALUE, b"\xff\xfe" + SECRET_VALUE.encode()):
        found = problem(FakeApi({"db": secret(value)}), spec.Storage(secret_name="db", secret_key="url"))
        assert (found.reason, found.field) == ("InvalidStorageURL", "spec.storage.secretRef.key"), found
        assert SECRET_VALUE not in str(found) and "xff" not in str(found), found


def test_an_opted_in_secret_gives_its_url_which_says_where_it_came_from(no_allow_list):
    url = f"postgresql+psycopg://speechtune:{PASSWORD}@db.team.svc:5432/speechtune"
    found = asyncio.run(storage_url(FakeApi({"db": secret(url)}), "team", spec.Storage(secret_name="db", secret_key="url")))
    assert found == url and found.source == "spec.storage.secretRef"
    assert PASSWORD not in repr(found)  # a traceback or a debug log of it shows no password


def test_a_missing_secret_and_a_missing_key_name_their_fields(no_allow_list):
    assert problem(FakeApi({}), spec.Storage(secret_name="db", secret_key="url")).reason == "SecretNotFound"
    found = problem(FakeApi({"db": secret("postgresql://h/d", key="other")}), spec.Storage(secret_name="db", secret_key="url"))
    assert (found.reason, found.field) == ("SecretKeyNotFound", "spec.storage.secretRef.key")


def test_warm_start_secret_must_opt_in_too(no_allow_list):
    study = types.SimpleNamespace(warm_start=spec.WarmStart(study="source", storage=spec.Storage(secret_name="api-keys", secret_key="url")))
    with pytest.raises(spec.SpecError) as caught:
        asyncio.run(warm_start_url(FakeApi({"api-keys": secret(SECRET_VALUE, opted_in=False)}), "team", study))
    assert caught.value.problems[0][0] == "spec.warmStart.storage.secretRef.name"
    assert str(caught.value).count("spec.warmStart.storage.secretRef.name") == 1, str(caught.value)
    assert SECRET_VALUE not in str(caught.value)


# --- SQLite: refused from every source


@pytest.mark.parametrize("url", ["sqlite:////tmp/tenant.db", "sqlite+pysqlite:///x.db", "SQLite:///x.db"])
def test_sqlite_is_refused_from_every_source(url, allow_list, monkeypatch):
    monkeypatch.setenv(runner.STUDY_URL_SCHEMES_ENV, "sqlite,postgresql")  # even an allow-list that names it
    found = problem(FakeApi({}), spec.Storage(url=url))
    assert (found.reason, found.field) == ("SQLiteRefused", "spec.storage.url")
    found = problem(FakeApi({"db": secret(url)}), spec.Storage(secret_name="db", secret_key="url"))
    assert (found.reason, found.field) == ("SQLiteRefused", "spec.storage.secretRef.key")
    found = problem(FakeApi({}), spec.Storage(url=url), "spec.warmStart.storage")
    assert (found.reason, found.field) == ("SQLiteRefused", "spec.warmStart.storage.url")
    monkeypatch.setenv(runner.STORAGE_ENV, url)
    found = problem(FakeApi({}), spec.Storage())
    assert (found.reason, found.field) == ("SQLiteRefused", "spec.storage") and runner.STORAGE_ENV in str(found)


# --- study-supplied URLs: off by default, else only the allow-list's schemes and hosts


def test_study_urls_are_off_without_an_allow_list(no_allow_list):
    for field in ("spec.storage", "spec.warmStart.storage"):
        found = problem(FakeApi({}), spec.Storage(url="postgresql+psycopg://speechtune@db.team.svc/speechtune"), field)
        assert (found.reason, found.field) == ("StudyURLNotAllowed", f"{field}.url")
        assert "storage.allowStudyUrls" in str(found)


@pytest.mark.parametrize(("url", "allowed"), [
    ("postgresql+psycopg://speechtune@db.team.svc/speechtune", True),
    ("postgresql://speechtune@DB.team.svc:5432/speechtune?sslmode=require", True),
    ("postgresql+psycopg://speechtune@other.db:6543/speechtune", True),
    ("postgresql+psycopg://speechtune@other.db:5432/speechtune", False),  # that host on another port only
    ("postgresql+psycopg://speechtune@kubernetes.default.svc:443/x", False),
    ("postgresql+psycopg://speechtune@127.0.0.1:6443/x", False),
    ("mysql+pymysql://speechtune@db.team.svc/speechtune", False),
    ("postgresql+psycopg2://speechtune@db.team.svc/speechtune", False),  # a scheme the list does not name
    ("postgresql+psycopg://speechtune@db.team.svc/speechtune?host=10.0.0.1", False),  # libpq's own host wins
    ("postgresql+psycopg://speechtune@db.team.svc/speechtune?hostaddr=10.0.0.1", False),
    ("postgresql+psycopg:///speechtune?host=/var/run/postgresql", False),  # a socket in the operator's filesystem
])
def test_study_urls_need_a_scheme_and_host_of_the_allow_list(url, allowed, allow_list):
    if allowed:
        assert checked_url(url, "spec.storage.url", from_study=True) == url
    else:
        found = problem(FakeApi({}), spec.Storage(url=url))
        assert (found.reason, found.field) == ("StudyURLNotAllowed", "spec.storage.url"), found


def test_the_allow_list_binds_study_urls_only_not_the_operators_own_or_opted_in_secrets(no_allow_list, monkeypatch):
    url = "postgresql+psycopg://speechtune@10.1.2.3/speechtune"
    assert asyncio.run(storage_url(FakeApi({"db": secret(url)}), "team", spec.Storage(secret_name="db", secret_key="url"))) == url
    monkeypatch.setenv(runner.STORAGE_ENV, url)
    assert asyncio.run(storage_url(FakeApi({}), "team", spec.Storage())).source == runner.STORAGE_ENV


# --- connection errors: generic in status, the detail in the log without the password


def test_a_storage_that_cannot_be_opened_is_told_generically_and_logged_without_password(caplog, no_allow_list):
    url = checked_url(f"postgresql+psycopg://speechtune:{PASSWORD}@127.0.0.1:{free_port()}/speechtune?connect_timeout=3",
                      "spec.storage.secretRef", from_study=False)
    with caplog.at_level(logging.WARNING, logger="speechtune.k8s.runner"), pytest.raises(StorageProblem) as caught:
        open_storage(url)
    assert (caught.value.reason, str(caught.value)) == (
        "StorageUnavailable", "spec.storage.secretRef: cannot connect to the study's storage: see the operator's log")
    assert "127.0.0.1" in caplog.text and "spec.storage.secretRef" in caplog.text, caplog.text  # the detail is logged
    assert PASSWORD not in caplog.text, caplog.text
    default = checked_url(url, runner.STORAGE_ENV, from_study=False)
    with pytest.raises(StorageProblem) as caught:
        open_storage(default)
    assert str(caught.value) == ("spec.storage: cannot connect to the operator's default storage (SPEECHTUNE_STORAGE_URL): "
                                 "see the operator's log")


def test_status_text_hides_what_a_storage_error_says():
    error = StorageUnavailable("cannot open study storage postgresql://u:***@10.0.0.9:5432/x: connection refused")
    assert status_text(error) == runner.UNREACHABLE
    assert status_text(ValueError("x" * 2000)) == "x" * 1000


# --- the real control plane

STUDY_AUTHOR = "study-author@example.com"  # a made-up user: may create and read studies and Events, nothing on Secrets


def schema_made(url: str) -> None:
    """Optuna's tables in the test database before studies race to make them (two first opens at once can
    collide on CREATE TABLE; the loser waits a retry, which these tests do not want to time)."""
    optuna.storages.RDBStorage(url).engine.dispose()


def author_may_create_studies_but_not_read_secrets(cluster, namespace: str) -> None:
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "study-author", "namespace": namespace},
            "rules": [{"apiGroups": ["speechtune.io"], "resources": ["speechtuningstudies"], "verbs": ["create", "get", "list"]},
                      {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "list"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "study-author", "namespace": namespace},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "study-author"},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": STUDY_AUTHOR}]}
    for body in (role, binding):
        cluster.kubectl("apply", "-f", "-", input=json.dumps(body))
    as_author = ("--as", STUDY_AUTHOR, "-n", namespace)
    wait_until(lambda: cluster.kubectl("auth", "can-i", "create", "speechtuningstudies", *as_author, check=False).returncode == 0,
               timeout=30, what="the study author's Role to take effect")
    assert cluster.kubectl("auth", "can-i", "get", "secrets", *as_author, check=False).stdout.strip() == "no"
    assert cluster.kubectl("auth", "can-i", "list", "secrets", *as_author, check=False).stdout.strip() == "no"


def create_secret(cluster, namespace: str, name: str, value: str, opted_in: bool) -> None:
    labels = {"speechtune.io/storage": "true"} if opted_in else {}
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "stringData": {"url": value}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(body))


def create_as_author(cluster, namespace: str, body: dict) -> None:
    cluster.kubectl("create", "--as", STUDY_AUTHOR, "-n", namespace, "-f", "-", input=json.dumps(body))


def seen_by_author(cluster, namespace: str, name: str) -> tuple[dict, str]:
    """The study's status and its Events' text, as the study's author reads them."""
    study = json.loads(cluster.kubectl("get", "speechtuningstudy", name, "--as", STUDY_AUTHOR, "-n", namespace, "-o", "json").stdout)
    events = json.loads(cluster.kubectl("get", "events", "--as", STUDY_AUTHOR, "-n", namespace, "--field-selector",
                                        f"involvedObject.name={name}", "-o", "json").stdout)["items"]
    return study.get("status") or {}, json.dumps([(event["reason"], event["message"]) for event in events])


def settled(cluster, namespace: str, name: str, reason: str | None = None, timeout: float = 60) -> dict:
    """The study's status once its Ready condition has a reason (``reason`` if given) other than Starting."""
    def ready() -> dict:
        status = study_status(cluster, namespace, name)
        found = {c["type"]: c for c in status.get("conditions", [])}.get("Ready", {}).get("reason")
        if found and found != "Starting" and (reason is None or found == reason or status.get("state") in ("Succeeded", "Failed")):
            return status
        return {}

    return wait_until(ready, timeout=timeout, what=f"study {name} to settle{f' on {reason}' if reason else ''}")


def ready(status: dict) -> tuple[str, str]:
    condition = {c["type"]: c for c in status.get("conditions", [])}["Ready"]
    return condition["reason"], condition["message"]


@pytest.mark.cluster
def test_a_study_author_without_rights_on_secrets_cannot_read_them_through_the_operator(crds, kube_namespace, postgres_url,
                                                                                         monkeypatch, caplog):
    """Secrets: one that does not opt in is not used and its value never shows; one that opts in but holds
    no URL is not shown either; a warm-start source's Secret must opt in as well; an opted-in Secret runs the
    study. Status and Events as the author reads them, and the operator's log."""
    cluster, namespace = crds, kube_namespace
    schema_made(postgres_url)
    author_may_create_studies_but_not_read_secrets(cluster, namespace)
    assert "Forbidden" in cluster.kubectl("get", "secret", "api-keys", "--as", STUDY_AUTHOR, "-n", namespace, check=False).stderr
    create_secret(cluster, namespace, "api-keys", SECRET_VALUE, opted_in=False)
    create_secret(cluster, namespace, "labelled-junk", SECRET_VALUE, opted_in=True)
    create_secret(cluster, namespace, "study-db", postgres_url, opted_in=True)
    ref = {"name": "api-keys", "key": "url"}
    studies = {
        "steal": small_study("steal", ["--sleep", "0"], storage={"secretRef": ref}),
        "junk": small_study("junk", ["--sleep", "0"], storage={"secretRef": {"name": "labelled-junk", "key": "url"}}),
        "warm": small_study("warm", ["--sleep", "0"], warmStart={"study": "x", "topK": 1, "storage": {"secretRef": ref}}),
        "fine": small_study("fine", ["--sleep", "0"], storage={"secretRef": {"name": "study-db", "key": "url"}}),
    }
    with caplog.at_level(logging.DEBUG), operator_running(cluster, namespace, postgres_url, monkeypatch):
        for body in studies.values():
            create_as_author(cluster, namespace, body)
        steal, junk, warm = (settled(cluster, namespace, name) for name in ("steal", "junk", "warm"))
        fine = wait_for_study_end(cluster, namespace, "fine", timeout=120)
        time.sleep(1)  # the last Events
        seen = {name: seen_by_author(cluster, namespace, name) for name in studies}
    for name, (status, events) in seen.items():
        assert SECRET_VALUE not in json.dumps(status) + events, (name, status, events)
    assert SECRET_VALUE not in caplog.text
    assert steal["state"] == "Pending"
    assert ready(steal) == ("SecretNotOptedIn", "spec.storage.secretRef.name: Secret 'api-keys' lacks the label "
                            "speechtune.io/storage=\"true\": the operator reads only Secrets that opt in "
                            "(kubectl label secret api-keys speechtune.io/storage=true)")
    assert ready(junk)[1].startswith("spec.storage.secretRef.key: key 'url' of Secret 'labelled-junk' is not a database URL")
    assert warm["state"] == "Failed" and warm["message"].startswith(
        "spec.warmStart.storage.secretRef.name: Secret 'api-keys' lacks the label"), warm
    assert fine["state"] == "Succeeded", fine


@pytest.mark.cluster
def test_study_urls_outside_the_allow_list_and_sqlite_are_refused_and_connection_errors_stay_generic(
        crds, kube_namespace, postgres_url, monkeypatch, caplog, tmp_path):
    """With the tests' allow-list (postgresql on 127.0.0.1): a URL of the list runs; another host is refused
    naming the field; SQLite is refused from a study's URL and from an opted-in Secret, and no file is
    made; the API server's port (open, another protocol) and a closed port read the same in status, and
    the operator's log has the detail without the password."""
    cluster, namespace = crds, kube_namespace
    schema_made(postgres_url)
    author_may_create_studies_but_not_read_secrets(cluster, namespace)
    database = tmp_path / "tenant.db"
    server = urllib.parse.urlsplit(yaml.safe_load(open(cluster.kubeconfig))["clusters"][0]["cluster"]["server"])
    assert server.hostname == "127.0.0.1", server  # the API server: an open port on an allowed host, not a database
    apiserver_port = server.port
    closed = f"postgresql+psycopg://speechtune:{PASSWORD}@127.0.0.1:{free_port()}/speechtune?connect_timeout=3"
    create_secret(cluster, namespace, "sqlite-db", f"sqlite:///{database}", opted_in=True)
    create_secret(cluster, namespace, "closed-db", closed, opted_in=True)
    studies = {
        "allowed": small_study("allowed", ["--sleep", "0"], storage={"url": postgres_url}),
        "elsewhere": small_study("elsewhere", ["--sleep", "0"], storage={"url": "postgresql+psycopg://speechtune@10.96.0.1:5432/x"}),
        "warm-elsewhere": small_study("warm-elsewhere", ["--sleep", "0"], warmStart={
            "study": "x", "topK": 1, "storage": {"url": "postgresql+psycopg://speechtune@10.96.0.1:5432/x"}}),
        "sqlite-url": small_study("sqlite-url", ["--sleep", "0"], storage={"url": f"sqlite:///{database}"}),
        "sqlite-secret": small_study("sqlite-secret", ["--sleep", "0"], storage={"secretRef": {"name": "sqlite-db", "key": "url"}}),
        "probe-open": small_study("probe-open", ["--sleep", "0"], storage={
            "url": f"postgresql+psycopg://speechtune@127.0.0.1:{apiserver_port}/x?connect_timeout=3"}),
        "probe-closed": small_study("probe-closed", ["--sleep", "0"], storage={
            "url": f"postgresql+psycopg://speechtune@127.0.0.1:{free_port()}/x?connect_timeout=3"}),
        "closed-secret": small_study("closed-secret", ["--sleep", "0"], storage={"secretRef": {"name": "closed-db", "key": "url"}}),
        "warm-closed": small_study("warm-closed", ["--sleep", "0"], warmStart={"study": "x", "topK": 1, "storage": {
            "url": f"postgresql+psycopg://speechtune@127.0.0.1:{free_port()}/x?connect_timeout=3"}}),
    }
    with caplog.at_level(logging.INFO), operator_running(cluster, namespace, postgres_url, monkeypatch):
        for body in studies.values():
            create_as_author(cluster, namespace, body)
        allowed = wait_for_study_end(cluster, namespace, "allowed", timeout=120)
        found = {name: settled(cluster, namespace, name) for name in studies if name != "allowed"}
        seen = {name: seen_by_author(cluster, namespace, name) for name in studies}
    assert allowed["state"] == "Succeeded", allowed
    assert ready(found["elsewhere"]) == ("StudyURLNotAllowed", "spec.storage.url: host 10.96.0.1:5432 is not in the operator's "
                                         "allow-list (storage.allowStudyUrls.hosts: 127.0.0.1)")
    assert found["warm-elsewhere"]["state"] == "Failed"
    assert found["warm-elsewhere"]["message"].startswith("spec.warmStart.storage.url: host 10.96.0.1:5432 is not in the"), found
    assert ready(found["sqlite-url"])[0] == "SQLiteRefused" and ready(found["sqlite-url"])[1].startswith("spec.storage.url: is SQLite")
    assert ready(found["sqlite-secret"])[0] == "SQLiteRefused"
    assert ready(found["sqlite-secret"])[1].startswith("spec.storage.secretRef.key: key 'url' of Secret 'sqlite-db' is SQLite")
    assert not database.exists() and not (tmp_path / "tenant.db-wal").exists()
    generic = "cannot connect to the study's storage: see the operator's log"
    assert ready(found["probe-open"]) == ("StorageUnavailable", f"spec.storage.url: {generic}")
    assert ready(found["probe-closed"]) == ready(found["probe-open"])
    assert ready(found["closed-secret"]) == ("StorageUnavailable", f"spec.storage.secretRef: {generic}")
    assert ready(found["warm-closed"]) == ("StorageUnavailable", generic)  # opened by the engine: a warm-start source
    for name, (status, events) in seen.items():
        shown = json.dumps(status) + events
        assert PASSWORD not in shown and "Connection refused" not in shown and "closed the connection" not in shown, (name, status, events)
        if name in ("probe-open", "probe-closed", "closed-secret", "warm-closed"):
            assert "127.0.0.1" not in shown, (name, status, events)
    assert PASSWORD not in caplog.text
    assert f"127.0.0.1:{apiserver_port}" in caplog.text  # the detail is in the operator's log


@pytest.mark.cluster
def test_study_urls_are_off_unless_the_operator_allows_them(crds, kube_namespace, postgres_url, monkeypatch):
    """The operator's default: no allow-list, so a study's own URL is refused, naming the field, even to a
    database the operator itself uses."""
    cluster, namespace = crds, kube_namespace
    off = {name: "" for name in STUDY_URL_ALLOW_LIST}
    with operator_running(cluster, namespace, postgres_url, monkeypatch, off):
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(
            small_study("own-url", ["--sleep", "0"], storage={"url": postgres_url})))
        status = settled(cluster, namespace, "own-url")
    assert status["state"] == "Pending"
    assert ready(status) == ("StudyURLNotAllowed", "spec.storage.url: study-supplied storage URLs are off in this operator "
                             "(its chart's storage.allowStudyUrls); use a secretRef to a Secret labelled speechtune.io/storage=true")

