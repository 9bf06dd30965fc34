"""The CRDs on the real API server: bad manifests are rejected at `kubectl apply` with the field named,
what may not change cannot, and what CEL cannot express becomes a Failed condition with reason InvalidSpec."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from speechtune import spec
from speechtune.k8s import studyspec
from tests.speechtune.k8s.helpers import REPO, get_json, operator_running, wait_until

pytestmark = pytest.mark.cluster
EXAMPLE = yaml.safe_load((REPO / "examples" / "k8s" / "fake-study.yaml").read_text())
LADDER = yaml.safe_load((REPO / "examples" / "k8s" / "fake-ladder.yaml").read_text())


def manifest(name: str = "bad", example: dict = EXAMPLE) -> dict:
    body = copy.deepcopy(example)
    body["metadata"] = {"name": name}
    return body


def at(body: dict, dotted: str):
    """The mapping holding the last key of a dotted path (list indexes as numbers)."""
    *parents, last = dotted.split(".")
    node = body
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    return node, (int(last) if isinstance(node, list) else last)


def setting(dotted: str, value):
    def change(body):
        node, key = at(body, dotted)
        node[key] = value
    return change


def removing(dotted: str):
    def change(body):
        node, key = at(body, dotted)
        del node[key]
    return change


def space(*params):
    return setting("spec.searchSpace", list(params))


LR = {"name": "lr", "float": {"low": 1e-5, "high": 1e-3, "log": True}}

# (id, change, the field the API server must name, words of its message)
BAD = [
    ("max-trials-zero", setting("spec.maxTrials", 0), "spec.maxTrials", "greater than or equal to 1"),
    ("parallelism-zero", setting("spec.parallelism", 0), "spec.parallelism", "greater than or equal to 1"),
    ("max-failed-negative", setting("spec.maxFailedTrials", -1), "spec.maxFailedTrials", "greater than or equal to 0"),
    ("pending-timeout-zero", setting("spec.pendingTimeoutSeconds", 0), "spec.pendingTimeoutSeconds", "greater than or equal to 1"),
    ("max-trials-string", setting("spec.maxTrials", "many"), "spec.maxTrials", "must be of type integer"),
    ("unknown-direction", setting("spec.objective.direction", "down"), "spec.objective.direction", "Unsupported value"),
    ("bad-metric-name", setting("spec.objective.metric", "val wer"), "spec.objective.metric", "should match"),
    ("unknown-sampler", setting("spec.sampler.type", "bayes"), "spec.sampler.type", "Unsupported value"),
    ("negative-seed", setting("spec.sampler.seed", -1), "spec.sampler.seed", "greater than or equal to 0"),
    ("unknown-pruner", setting("spec.pruner.type", "asha"), "spec.pruner.type", "Unsupported value"),
    ("hyperband-without-max", removing("spec.pruner.maxResource"), "spec.pruner.maxResource", "is required for hyperband"),
    ("min-over-max-resource", setting("spec.pruner.minResource", 10), "spec.pruner.minResource", "must be <= maxResource"),
    ("reduction-factor-one", setting("spec.pruner.reductionFactor", 1), "spec.pruner.reductionFactor", "greater than or equal to 2"),
    ("empty-search-space", space(), "spec.searchSpace", "should have at least 1 items"),
    ("duplicate-param", space(LR, LR), "spec.searchSpace[1]", "Duplicate value"),
    ("bad-param-name", space({"name": "learning-rate", "float": {"low": 0.1, "high": 1}}), "spec.searchSpace[0].name", "should match"),
    ("param-without-kind", space({"name": "lr"}), "spec.searchSpace[0]", "must validate one and only one schema"),
    ("param-with-two-kinds", space({"name": "lr", "float": {"low": 0.1, "high": 1}, "int": {"low": 1, "high": 2}}),
     "spec.searchSpace[0]", "must validate one and only one schema"),
    ("float-low-over-high", space({"name": "lr", "float": {"low": 1, "high": 0.1}}), "spec.searchSpace[0].float.low", "must be <= high"),
    ("int-low-over-high", space({"name": "n", "int": {"low": 5, "high": 2}}), "spec.searchSpace[0].int.low", "must be <= high"),
    ("float-log-zero-low", space({"name": "lr", "float": {"low": 0, "high": 1, "log": True}}),
     "spec.searchSpace[0].float.low", "must be > 0 when log is true"),
    ("int-log-zero-low", space({"name": "n", "int": {"low": 0, "high": 8, "log": True}}),
     "spec.searchSpace[0].int.low", "must be > 0 when log is true"),
    ("float-step-negative", space({"name": "x", "float": {"low": 0, "high": 1, "step": -0.1}}),
     "spec.searchSpace[0].float.step", "must be > 0"),
    ("float-log-with-step", space({"name": "x", "float": {"low": 0.1, "high": 1, "step": 0.1, "log": True}}),
     "spec.searchSpace[0].float.step", "cannot be combined with log"),
    ("int-step-zero", space({"name": "n", "int": {"low": 0, "high": 8, "step": 0}}),
     "spec.searchSpace[0].int.step", "greater than or equal to 1"),
    ("int-bound-fraction", space({"name": "n", "int": {"low": 0.5, "high": 8}}), "spec.searchSpace[0].int.low", "must be of type integer"),
    ("empty-categorical", space({"name": "c", "categorical": []}), "spec.searchSpace[0].categorical", "should have at least 1 items"),
    ("grid-float-without-step", lambda b: (setting("spec.sampler.type", "grid")(b), setting("spec.pruner.type", "none")(b)),
     "spec.searchSpace", "the grid sampler needs a step"),
    ("template-without-command", removing("spec.trialTemplate.command"), "spec.trialTemplate.command", "Required value"),
    ("template-empty-command", setting("spec.trialTemplate.command", []), "spec.trialTemplate.command", "should have at least 1 items"),
    ("template-without-image", removing("spec.trialTemplate.image"), "spec.trialTemplate.image", "Required value"),
    ("env-without-value", setting("spec.trialTemplate.env", [{"name": "A"}]), "spec.trialTemplate.env[0].value", "Required value"),
    ("negative-backoff", setting("spec.trialTemplate.backoffLimit", -1), "spec.trialTemplate.backoffLimit", "greater than or equal to 0"),
    ("storage-url-and-secret", setting("spec.storage", {"url": "sqlite:///x.db", "secretRef": {"name": "db", "key": "url"}}),
     "spec.storage", "give either url or secretRef, not both"),
    ("secret-ref-without-key", setting("spec.storage", {"secretRef": {"name": "db"}}), "spec.storage.secretRef.key", "Required value"),
    ("storage-url-not-a-url", setting("spec.storage", {"url": "postgres"}), "spec.storage.url", "should match"),
    ("negative-keep-trials", setting("spec.retention", {"keepTrials": -1}), "spec.retention.keepTrials", "greater than or equal to 0"),
    ("unknown-field", setting("spec.maxTrails", 5), "spec.maxTrails", "unknown field"),
    ("no-search-space", removing("spec.searchSpace"), "spec.searchSpace", "Required value"),
    ("name-too-long", lambda b: b["metadata"].update(name="s" * 64), "metadata.name", "at most 63 characters"),
    ("validation-without-fidelity", setting("spec.validation", {"seeds": 3}), "spec.validation.seeds", "needs spec.fidelity"),
]
LOW, HIGH = {"name": "low", "overrides": {"epochs": 1}}, {"name": "high", "overrides": {"epochs": 9}}
BAD_LADDERS = [  # changes to examples/k8s/fake-ladder.yaml
    ("one-level", setting("spec.fidelity.levels", [LOW]), "spec.fidelity.levels", "should have at least 2 items"),
    ("no-levels", removing("spec.fidelity.levels"), "spec.fidelity.levels", "Required value"),
    ("duplicate-level", setting("spec.fidelity.levels", [LOW, LOW]), "spec.fidelity.levels[1]", "Duplicate value"),
    ("level-without-name", setting("spec.fidelity.levels", [LOW, {"overrides": {"epochs": 9}}]),
     "spec.fidelity.levels[1].name", "Required value"),
    ("level-name-not-a-dns-label", setting("spec.fidelity.levels", [LOW, dict(HIGH, name="High Fidelity")]),
     "spec.fidelity.levels[1].name", "should match"),
    ("overrides-not-a-map", setting("spec.fidelity.levels", [LOW, dict(HIGH, overrides=[1])]),
     "spec.fidelity.levels[1].overrides", "must be of type object"),
    ("reduction-factor-one", setting("spec.fidelity.reductionFactor", 1), "spec.fidelity.reductionFactor",
     "greater than or equal to 2"),
    ("initial-trials-zero", setting("spec.fidelity.initialTrials", 0), "spec.fidelity.initialTrials", "greater than or equal to 1"),
    ("too-few-initial-trials", setting("spec.fidelity.initialTrials", 15), "spec.fidelity.initialTrials",
     "must be >= reductionFactor^(levels-1)"),
    ("unknown-mode", setting("spec.fidelity.mode", "hyperband"), "spec.fidelity.mode", "Unsupported value"),
    ("resume-not-a-boolean", setting("spec.fidelity.resumeFromCheckpoint", "yes"), "spec.fidelity.resumeFromCheckpoint",
     "must be of type boolean"),
    ("correlation-warning-above-one", setting("spec.fidelity.correlationWarning", 1.5), "spec.fidelity.correlationWarning",
     "less than or equal to 1"),
    ("correlation-warning-below-minus-one", setting("spec.fidelity.correlationWarning", -2), "spec.fidelity.correlationWarning",
     "greater than or equal to -1"),
    ("checkpoint-volume-not-a-pvc-name", setting("spec.fidelity.checkpointVolume", "/scratch/ckpt"),
     "spec.fidelity.checkpointVolume", "should match"),
    ("fidelity-with-a-pruner", setting("spec.pruner", {"type": "median"}), "spec.pruner.type", "must be none with spec.fidelity"),
    ("negative-seeds", setting("spec.validation.seeds", -1), "spec.validation.seeds", "greater than or equal to 0"),
    ("unknown-fidelity-field", setting("spec.fidelity.brackets", 3), "spec.fidelity.brackets", "unknown field"),
]


@pytest.mark.parametrize("example, change, field, words",
                         [(EXAMPLE, *case[1:]) for case in BAD] + [(LADDER, *case[1:]) for case in BAD_LADDERS],
                         ids=[case[0] for case in BAD] + [f"ladder-{case[0]}" for case in BAD_LADDERS])
def test_api_server_rejects_bad_study_naming_the_field(crds, kube_namespace, example, change, field, words):
    body = manifest(example=example)
    change(body)
    result = crds.kubectl("apply", "--dry-run=server", "-n", kube_namespace, "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0, f"accepted: {json.dumps(body['spec'])}"
    assert field in result.stderr and words in result.stderr, result.stderr


def test_the_example_is_accepted_and_defaulted(crds, kube_namespace):
    result = crds.kubectl("apply", "--dry-run=server", "-n", kube_namespace, "-f", "-", "-o", "json",
                          input=json.dumps(manifest("good")))
    applied = json.loads(result.stdout)
    assert applied["spec"]["storage"] == {"deleteOnStudyDeletion": False}
    assert applied["spec"]["trialTemplate"]["backoffLimit"] == 0
    study, options = studyspec.parse(applied)  # what the API server accepts, the operator's parser accepts
    assert (study.max_trials, study.parallelism, options.job.image) == (20, 4, EXAMPLE["spec"]["trialTemplate"]["image"])


@pytest.mark.parametrize("dotted, value, field", [
    ("spec.searchSpace.4.float.high", 1e-2, "spec.searchSpace"),
    ("spec.objective.direction", "maximize", "spec.objective"),
    ("spec.sampler.seed", 7, "spec.sampler"),
    ("spec.pruner.reductionFactor", 4, "spec.pruner"),
], ids=["searchSpace", "objective", "sampler", "pruner"])
def test_what_the_study_searches_is_immutable(crds, kube_namespace, dotted, value, field):
    crds.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(manifest("frozen")))
    body = manifest("frozen")
    setting(dotted, value)(body)
    result = crds.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0
    assert field in result.stderr and "is immutable" in result.stderr, result.stderr


def test_the_ladder_example_is_accepted_and_defaulted(crds, kube_namespace):
    body = manifest("good-ladder", LADDER)
    del body["spec"]["fidelity"]["mode"]
    result = crds.kubectl("apply", "--dry-run=server", "-n", kube_namespace, "-f", "-", "-o", "json", input=json.dumps(body))
    applied = json.loads(result.stdout)
    assert (applied["spec"]["fidelity"]["mode"], applied["spec"]["fidelity"]["resumeFromCheckpoint"]) == ("synchronous", True)
    study, _ = studyspec.parse(applied)
    assert (study.fidelity.rung_sizes(), study.validation_seeds) == ([16, 4, 1], 2)


@pytest.mark.parametrize("change, field", [
    (setting("spec.fidelity.reductionFactor", 2), "spec.fidelity"),
    (setting("spec.fidelity.levels.1.overrides", {"epochs": 3}), "spec.fidelity"),
    (removing("spec.fidelity"), "spec.fidelity"),
], ids=["reductionFactor", "overrides", "removed"])
def test_the_fidelity_ladder_is_immutable(crds, kube_namespace, change, field):
    crds.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(manifest("frozen-ladder", LADDER)))
    body = manifest("frozen-ladder", LADDER)
    change(body)
    result = crds.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0
    assert field in result.stderr and "is immutable" in result.stderr, result.stderr


def test_a_ladder_cannot_be_added_to_a_running_study(crds, kube_namespace):
    body = manifest("plain")
    body["spec"]["pruner"] = {"type": "none"}
    crds.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
    body["spec"]["fidelity"] = LADDER["spec"]["fidelity"]
    result = crds.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0
    assert "spec.fidelity" in result.stderr and "is immutable" in result.stderr, result.stderr


def test_budgets_may_change(crds, kube_namespace):
    crds.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(manifest("budget")))
    body = manifest("budget")
    body["spec"].update(maxTrials=50, parallelism=8, maxFailedTrials=10)
    crds.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
    ladder = manifest("budget-ladder", LADDER)
    crds.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(ladder))
    ladder["spec"].update(parallelism=8, validation={"seeds": 5})  # more seeds: the winner is retrained again
    crds.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(ladder))


def test_every_schema_field_has_a_description(crds):
    explained = crds.kubectl("explain", "speechtuningstudy.spec", "--recursive").stdout
    assert "pendingTimeoutSeconds" in explained
    for crd in ("speechtuningstudies", "speechtuningtrials"):
        schema = yaml.safe_load((REPO / "crds" / f"{crd}.yaml").read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert not list(_undescribed(schema, crd))


def _undescribed(node: dict, where: str):
    for name, child in (node.get("properties") or {}).items():
        if name != "metadata" and "description" not in child:
            yield f"{where}.{name}"
        yield from _undescribed(child, f"{where}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _undescribed(node["items"], f"{where}[]")


def test_what_cel_cannot_express_fails_the_study_with_invalid_spec(crds, kube_namespace, postgres_url, monkeypatch):
    body = manifest("dup-choices")
    body["spec"]["searchSpace"].append({"name": "encoder", "categorical": ["lstm", "lstm"]})
    with pytest.raises(spec.SpecError):
        studyspec.parse(body)
    with operator_running(crds, kube_namespace, postgres_url, monkeypatch):
        crds.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
        status = wait_until(lambda: get_json(crds, "stune", "dup-choices", "-n", kube_namespace).get("status"),
                            timeout=30, what="a status")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (status["state"], failed["status"], failed["reason"]) == ("Failed", "True", "InvalidSpec")
    assert "spec.searchSpace[5].categorical" in failed["message"] and "duplicate choices" in failed["message"]
    assert not get_json(crds, "jobs", "-n", kube_namespace)["items"]
