"""The CRDs on the real API server: bad manifests are rejected at `kubectl apply` with the field named,
what may not change cannot, and what CEL cannot express becomes a Failed condition with reason InvalidSpec."""

from __future__ import annotations

import copy
import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from speechtune import cli, spec
from speechtune.k8s import studyspec
from tests.speechtune import test_spec as spec_cases  # the spec tests' table of invalid studies (INVALID)
from tests.speechtune.k8s.helpers import REPO, get_json, operator_running, wait_until

pytestmark = pytest.mark.cluster
EXAMPLE = yaml.safe_load((REPO / "examples" / "k8s" / "fake-study.yaml").read_text())
LADDER = yaml.safe_load((REPO / "examples" / "k8s" / "fake-ladder.yaml").read_text())
STAGED = yaml.safe_load((REPO / "examples" / "k8s" / "staged-study.yaml").read_text())


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
    ("workers-unknown-mode", setting("spec.trialTemplate.workers", {"mode": "hot"}), "spec.trialTemplate.workers.mode",
     "Unsupported value"),
    ("replicas-zero", setting("spec.trialTemplate.replicas", 0), "spec.trialTemplate.replicas", "greater than or equal to 1"),
    ("replicas-above-128", setting("spec.trialTemplate.replicas", 129), "spec.trialTemplate.replicas", "less than or equal to 128"),
    ("replicas-with-pod-retries", lambda b: (setting("spec.trialTemplate.replicas", 2)(b), setting("spec.trialTemplate.backoffLimit", 1)(b)),
     "spec.trialTemplate.backoffLimit", "must be 0 with replicas > 1"),
    ("replicas-with-warm-workers", lambda b: (setting("spec.trialTemplate.replicas", 2)(b),
                                              setting("spec.trialTemplate.workers", {"mode": "warm"})(b)),
     "spec.trialTemplate.replicas", "must be 1 with workers.mode warm"),
    ("template-label-of-the-operator", setting("spec.trialTemplate.labels", {"speechtune.io/trial": "7"}), "spec.trialTemplate.labels",
     "is the operator's or the Job controller's own"),
    ("workers-zero-runs", setting("spec.trialTemplate.workers", {"maxRunsPerWorker": 0}), "spec.trialTemplate.workers.maxRunsPerWorker",
     "greater than or equal to 1"),
    ("workers-zero-grace", setting("spec.trialTemplate.workers", {"stopGraceSeconds": 0}), "spec.trialTemplate.workers.stopGraceSeconds",
     "greater than 0"),
    ("workers-zero-rss", setting("spec.trialTemplate.workers", {"maxRssMiB": 0}), "spec.trialTemplate.workers.maxRssMiB",
     "greater than or equal to 1"),
    ("storage-url-and-secret", setting("spec.storage", {"url": "sqlite:///x.db", "secretRef": {"name": "db", "key": "url"}}),
     "spec.storage", "give either url or secretRef, not both"),
    ("secret-ref-without-key", setting("spec.storage", {"secretRef": {"name": "db"}}), "spec.storage.secretRef.key", "Required value"),
    ("storage-url-not-a-url", setting("spec.storage", {"url": "postgres"}), "spec.storage.url", "should match"),
    ("negative-keep-trials", setting("spec.retention", {"keepTrials": -1}), "spec.retention.keepTrials", "greater than or equal to 0"),
    ("unknown-field", setting("spec.maxTrails", 5), "spec.maxTrails", "unknown field"),
    ("no-search-space", removing("spec.searchSpace"), "spec.searchSpace", "Required value"),
    ("name-too-long", lambda b: b["metadata"].update(name="s" * 64), "metadata.name", "at most 63 characters"),
    ("validation-without-fidelity", setting("spec.validation", {"seeds": 3}), "spec.validation.seeds", "needs spec.fidelity"),
    ("warm-start-does-nothing", setting("spec.warmStart", {"study": "source"}), "spec.warmStart", "does nothing"),
    ("warm-start-without-study", setting("spec.warmStart", {"topK": 2}), "spec.warmStart.study", "Required value"),
    ("warm-start-empty-study", setting("spec.warmStart", {"study": "", "topK": 2}), "spec.warmStart.study", "at least 1 chars"),
    ("warm-start-negative-top-k", setting("spec.warmStart", {"study": "source", "topK": -1}), "spec.warmStart.topK",
     "greater than or equal to 0"),
    ("warm-start-init-from-latest", setting("spec.warmStart", {"study": "source", "initFrom": "latest"}), "spec.warmStart.initFrom",
     "Unsupported value"),
    ("warm-start-narrow-top-k-zero", setting("spec.warmStart", {"study": "source", "narrow": {"topK": 0}}),
     "spec.warmStart.narrow.topK", "greater than or equal to 1"),
    ("warm-start-margin-above-one", setting("spec.warmStart", {"study": "source", "narrow": {"margin": 1.5}}),
     "spec.warmStart.narrow.margin", "less than or equal to 1"),
    ("warm-start-fixed-not-a-name", setting("spec.warmStart", {"study": "source", "fixed": ["num-layers"]}),
     "spec.warmStart.fixed[0]", "should match"),
    ("warm-start-fixed-not-a-list", setting("spec.warmStart", {"study": "source", "fixed": "encoder"}),
     "spec.warmStart.fixed", "must be of type array"),
    ("warm-start-url-and-secret", setting("spec.warmStart", {"study": "source", "topK": 1, "storage": {
        "url": "sqlite:///x.db", "secretRef": {"name": "db", "key": "url"}}}), "spec.warmStart.storage", "give either url or secretRef"),
    ("warm-start-unknown-field", setting("spec.warmStart", {"study": "source", "topK": 1, "copy": True}),
     "spec.warmStart.copy", "unknown field"),
    ("checkpoints-negative-keep-best", setting("spec.checkpoints", {"keepBest": -1}), "spec.checkpoints.keepBest",
     "greater than or equal to 0"),
    ("checkpoints-volume-a-path", setting("spec.checkpoints", {"keepBest": 1, "volume": "/scratch"}), "spec.checkpoints.volume",
     "should match"),
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
    ("cost-warning-above-one", setting("spec.fidelity.costWarning", 1.5), "spec.fidelity.costWarning",
     "less than or equal to 1"),
    ("cost-warning-zero", setting("spec.fidelity.costWarning", 0), "spec.fidelity.costWarning", "greater than 0"),
    ("checkpoint-volume-not-a-pvc-name", setting("spec.fidelity.checkpointVolume", "/scratch/ckpt"),
     "spec.fidelity.checkpointVolume", "should match"),
    ("fidelity-with-a-pruner", setting("spec.pruner", {"type": "median"}), "spec.pruner.type", "must be none with spec.fidelity"),
    ("negative-seeds", setting("spec.validation.seeds", -1), "spec.validation.seeds", "greater than or equal to 0"),
    ("unknown-fidelity-field", setting("spec.fidelity.rankBy", "cer"), "spec.fidelity.rankBy", "unknown field"),
    ("brackets-above-levels", setting("spec.fidelity.brackets", 4), "spec.fidelity.brackets", "must be <= the number of levels"),
    ("brackets-above-six", setting("spec.fidelity.brackets", 7), "spec.fidelity.brackets", "less than or equal to 6"),
    ("rank-metric-unknown", setting("spec.fidelity.levels.0.rank", {"metric": "loss"}), "spec.fidelity.levels",
     "must be wer, cer, val_loss or the objective's metric"),
    ("rank-tie-break-is-the-metric", setting("spec.fidelity.levels.1.rank", {"metric": "val_loss", "tieBreak": {"metric": "val_loss"}}),
     "spec.fidelity.levels[1].rank.tieBreak.metric", "must differ from rank.metric"),
    ("rank-metric-empty", setting("spec.fidelity.levels.0.rank", {"metric": ""}), "spec.fidelity.levels[0].rank.metric", "should match"),
    ("rank-unknown-field", setting("spec.fidelity.levels.0.rank", {"metric": "cer", "by": "wer"}), "spec.fidelity.levels[0].rank.by",
     "unknown field"),
    ("checkpoints-volume-not-the-ladders", lambda b: (setting("spec.fidelity.checkpointVolume", "ckpt")(b),
                                                      setting("spec.checkpoints", {"keepBest": 1, "volume": "other"})(b)),
     "spec.checkpoints.volume", "must be the PVC that fidelity.checkpointVolume names"),
]
LOW_HIGH = {"levels": [LOW, HIGH], "reductionFactor": 2, "initialTrials": 4}


def stage(index: int, **fields):
    """Replace fields of spec.stages[index] (None removes one)."""
    def change(body):
        entry = body["spec"]["stages"][index]
        entry.update(fields)
        for name in [name for name, value in fields.items() if value is None]:
            del entry[name]
    return change


def stages(*entries):
    return setting("spec.stages", list(entries))


def both(*changes):
    def change(body):
        for each in changes:
            each(body)
    return change


BASELINE, COARSE = {"name": "baseline", "kind": "baseline"}, {"name": "coarse", "kind": "search", "maxTrials": 4}
# (id, change to examples/k8s/staged-study.yaml, the field the API server names, words of its message,
#  the field the operator's parser (speechtune.spec) names for the same manifest)
BAD_STAGES = [
    ("no-stages", stages(), "spec.stages", "should have at least 1 items", "spec.stages"),
    ("name-not-a-dns-label", stage(1, name="Coarse Search"), "spec.stages[1].name", "should match", "spec.stages[1].name"),
    ("name-too-long", stage(1, name="c" * 41), "spec.stages[1].name", "Too long", "spec.stages[1].name"),
    ("duplicate-name", stage(1, name="baseline"), "spec.stages[1]", "Duplicate value", "spec.stages[1].name"),
    ("without-name", stage(1, name=None), "spec.stages[1].name", "Required value", "spec.stages[1].name"),
    ("without-kind", stage(1, kind=None), "spec.stages[1].kind", "Required value", "spec.stages[1].kind"),
    ("unknown-kind", stage(1, kind="explore"), "spec.stages[1].kind", "Unsupported value", "spec.stages[1].kind"),
    ("refine-first", stages({"name": "fine", "kind": "refine", "maxTrials": 4}, COARSE), "spec.stages",
     "the first stage must be a baseline or a search", "spec.stages[0].kind"),
    ("validate-first", stages({"name": "check", "kind": "validate"}, BASELINE), "spec.stages",
     "the first stage must be a baseline or a search", "spec.stages[0].kind"),
    ("search-without-max-trials", stage(1, maxTrials=None), "spec.stages[1].maxTrials", "is required for a search or refine stage",
     "spec.stages[1].maxTrials"),
    ("refine-without-max-trials", stage(2, maxTrials=None), "spec.stages[2].maxTrials", "is required for a search or refine stage",
     "spec.stages[2].maxTrials"),
    ("max-trials-zero", stage(1, maxTrials=0), "spec.stages[1].maxTrials", "greater than or equal to 1", "spec.stages[1].maxTrials"),
    ("max-trials-with-fidelity", stage(1, fidelity=LOW_HIGH), "spec.stages[1].maxTrials", "not with fidelity",
     "spec.stages[1].maxTrials"),
    ("baseline-with-max-trials", stage(0, maxTrials=3), "spec.stages[0].maxTrials", "is only for a search or refine stage",
     "spec.stages[0].maxTrials"),
    ("baseline-with-sampler", stage(0, sampler={"type": "random"}), "spec.stages[0].sampler", "is only for a search or refine stage",
     "spec.stages[0].sampler"),
    ("validate-with-pruner", stage(3, pruner={"type": "median"}), "spec.stages[3].pruner", "is only for a search or refine stage",
     "spec.stages[3].pruner"),
    ("baseline-with-fidelity", stage(0, fidelity=LOW_HIGH), "spec.stages[0].fidelity", "is only for a search or refine stage",
     "spec.stages[0].fidelity"),
    ("validate-with-fixed", stage(3, fixed={"encoder": "lstm"}), "spec.stages[3].fixed", "is only for a search or refine stage",
     "spec.stages[3].fixed"),
    ("refine-with-search-space", stage(2, searchSpace=[{"name": "num_layers", "int": {"low": 4, "high": 8}}]),
     "spec.stages[2].searchSpace", "is only for a search stage", "spec.stages[2].searchSpace"),
    ("search-with-top-k", stage(1, topK=3), "spec.stages[1].topK", "is only for a refine stage", "spec.stages[1].topK"),
    ("search-with-margin", stage(1, margin=0.2), "spec.stages[1].margin", "is only for a refine stage", "spec.stages[1].margin"),
    ("search-with-params", stage(1, params={"lr": 0.001}), "spec.stages[1].params", "is only for a baseline stage",
     "spec.stages[1].params"),
    ("refine-with-seeds", stage(2, seeds=2), "spec.stages[2].seeds", "is only for a baseline or validate stage", "spec.stages[2].seeds"),
    ("seeds-zero", stage(3, seeds=0), "spec.stages[3].seeds", "greater than or equal to 1", "spec.stages[3].seeds"),
    ("top-k-zero", stage(2, topK=0), "spec.stages[2].topK", "greater than or equal to 1", "spec.stages[2].topK"),
    ("margin-above-one", stage(2, margin=1.5), "spec.stages[2].margin", "less than or equal to 1", "spec.stages[2].margin"),
    ("negative-margin", stage(2, margin=-0.1), "spec.stages[2].margin", "greater than or equal to 0", "spec.stages[2].margin"),
    ("unknown-stage-field", stage(1, brackets=3), "spec.stages[1].brackets", "unknown field", "spec.stages[1].brackets"),
    ("unknown-sampler", stage(1, sampler={"type": "bayes"}), "spec.stages[1].sampler.type", "Unsupported value",
     "spec.stages[1].sampler.type"),
    ("hyperband-without-max-resource", stage(2, pruner={"type": "hyperband"}), "spec.stages[2].pruner.maxResource",
     "is required for hyperband", "spec.stages[2].pruner.maxResource"),
    ("fidelity-with-the-stages-pruner", both(stage(1, maxTrials=None, fidelity=LOW_HIGH, pruner={"type": "median"})),
     "spec.stages", "a stage with fidelity needs pruner type none", "spec.stages[1].pruner.type"),
    ("fidelity-with-the-spec-pruner", both(stage(1, maxTrials=None, fidelity=LOW_HIGH), setting("spec.pruner", {"type": "median"})),
     "spec.stages", "a stage with fidelity needs pruner type none", "spec.stages[1].pruner.type"),
    ("fidelity-one-level", stage(1, maxTrials=None, fidelity={"levels": [LOW]}), "spec.stages[1].fidelity.levels",
     "should have at least 2 items", "spec.stages[1].fidelity.levels"),
    ("fidelity-too-few-initial-trials", stage(1, maxTrials=None, fidelity=dict(LOW_HIGH, initialTrials=1)),
     "spec.stages[1].fidelity.initialTrials", "must be >= reductionFactor^(levels-1)", "spec.stages[1].fidelity.initialTrials"),
    ("region-outside-the-space", stage(1, searchSpace=[{"name": "lr", "float": {"low": 1e-7, "high": 1e-3, "log": True}}]),
     "spec.stages", "a stage's searchSpace narrows spec.searchSpace", "spec.stages[1].searchSpace[0]"),
    ("region-of-an-unknown-parameter", stage(1, searchSpace=[{"name": "dropout", "float": {"low": 0.1, "high": 0.3}}]),
     "spec.stages", "a stage's searchSpace narrows spec.searchSpace", "spec.stages[1].searchSpace[0].name"),
    ("region-of-another-kind", stage(1, searchSpace=[{"name": "num_layers", "float": {"low": 4, "high": 8}}]),
     "spec.stages", "a stage's searchSpace narrows spec.searchSpace", "spec.stages[1].searchSpace[0]"),
    ("region-low-over-high", stage(1, searchSpace=[{"name": "num_layers", "int": {"low": 8, "high": 4}}]),
     "spec.stages[1].searchSpace[0].int.low", "must be <= high", "spec.stages[1].searchSpace[0].int.low"),
    ("spec-fidelity-with-stages", setting("spec.fidelity", LOW_HIGH), "spec.fidelity", "not with spec.stages", "spec.fidelity"),
    ("validation-seeds-with-stages", setting("spec.validation", {"seeds": 2}), "spec.validation.seeds", "not with spec.stages",
     "spec.validation.seeds"),
    ("two-checkpoint-volumes-in-stages", both(
        stage(1, maxTrials=None, fidelity=dict(LOW_HIGH, checkpointVolume="one")),
        stage(2, maxTrials=None, pruner=None, fidelity=dict(LOW_HIGH, checkpointVolume="two"))),
     "spec.stages", "must name the same PVC", "spec.stages[2].fidelity.checkpointVolume"),
    ("checkpoints-volume-not-the-stages", both(
        stage(1, maxTrials=None, fidelity=dict(LOW_HIGH, checkpointVolume="one")),
        setting("spec.checkpoints", {"keepBest": 2, "volume": "two"})),
     "spec.checkpoints.volume", "must be the PVC that fidelity.checkpointVolume names", "spec.checkpoints.volume"),
]


# One object per invalid case, sent to the API server together (see dry_run): the CRD's own cases above and
# every invalid case of the spec tests (tests/speechtune/test_spec.py INVALID) in the Kubernetes form.
def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:63].strip("-")


CRD_CASES = [(f"crd-{case[0]}", EXAMPLE, *case[1:4], None) for case in BAD] \
    + [(f"ladder-{case[0]}", LADDER, *case[1:4], None) for case in BAD_LADDERS] \
    + [(f"stages-{case[0]}", STAGED, *case[1:5]) for case in BAD_STAGES]  # (name, example, change, field, words, parser's field)


def crd_case_body(name: str, example: dict, change) -> dict:
    body = manifest(slug(name), example)
    change(body)
    return body


def to_cluster(document: dict, name: str) -> dict:
    """A study file as a study object: its name (unless the case is about the name), the Kubernetes forms of
    searchSpace and env, and the image a cluster requires."""
    body = copy.deepcopy(document)
    if isinstance(body.get("metadata"), dict) and body["metadata"].get("name") == spec_cases.manifest()["metadata"]["name"]:
        body["metadata"]["name"] = name
    raw = body.get("spec")
    if isinstance(raw, dict):
        if isinstance(raw.get("search_space"), dict) and "searchSpace" not in raw:
            raw["searchSpace"] = [{"name": key, "categorical": choices} for key, choices in raw.pop("search_space").items()]
        template = raw.get("trialTemplate")
        if isinstance(template, dict):
            template.setdefault("image", "speechtune-trainer:test")
            if isinstance(template.get("env"), dict):
                template["env"] = [{"name": key, "value": value} for key, value in template["env"].items()]
    return body


SPEC_CASES = {case.id: (slug(f"spec-{case.id}"), case) for case in spec_cases.INVALID}
BODIES = {slug(name): crd_case_body(name, example, change) for name, example, change, *_ in CRD_CASES} | {
    name: to_cluster(case.manifest(), name) for name, case in SPEC_CASES.values() if not case.local_only}
NAMES = {key: body["metadata"]["name"] for key, body in BODIES.items()}  # a case about the name sets its own
assert len(set(NAMES.values())) == len(BODIES) == len(CRD_CASES) + sum(not case.local_only for case in spec_cases.INVALID)

ADMITTED = re.compile(r"^speechtuningstudy\.speechtune\.io/(?P<name>\S+) (?:created|configured|unchanged) \(server dry run\)$", re.M)
ANSWER = re.compile(r"^(?=Error from server|error: |resource mapping not found|Warning: )", re.M)
NAMED = re.compile(r'SpeechTuningStudy\.speechtune\.io "(?P<name>[^"]+)" is invalid|for name: "(?P<mapping>[^"]+)"')
RULE_FAILED = ("evaluating rule", "index out of bounds", "no such key", "no matching overload")  # a CEL rule that broke, not a verdict


def dry_run(cluster, namespace: str, bodies: list[dict]) -> dict[str, str | None]:
    """`kubectl apply --dry-run=server` of many objects: object name -> None when the API server admits it, else its answer.

    One kubectl call sends them all (kubectl carries on past a rejected object and names it in its error). A
    strict-decoding error (an unknown field) names no object: those objects are sent again, one per call, concurrently.
    """
    verdicts: dict[str, str | None] = {}
    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", check=False, timeout=300,
                             input="\n---\n".join(json.dumps(body) for body in bodies))
    verdicts.update((match["name"], None) for match in ADMITTED.finditer(result.stdout))
    for answer in ANSWER.split(result.stderr):
        named = NAMED.search(answer)
        if named:
            verdicts[named["name"] or named["mapping"]] = answer.strip()
    unnamed = [body for body in bodies if body["metadata"]["name"] not in verdicts]
    with ThreadPoolExecutor(max_workers=4) as pool:
        alone = pool.map(lambda body: cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                                      input=json.dumps(body), check=False), unnamed)
        for body, answer in zip(unnamed, alone):
            verdicts[body["metadata"]["name"]] = None if answer.returncode == 0 else answer.stderr.strip()
    return verdicts


@pytest.fixture(scope="module")
def verdicts(crds):
    """The API server's answer to every invalid case of this module and of the spec tests, by object name."""
    namespace = f"crd-cases-{uuid.uuid4().hex[:6]}"
    crds.kubectl("create", "namespace", namespace)
    try:
        yield dry_run(crds, namespace, list(BODIES.values()))
    finally:
        crds.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def names_field(answer: str, field: str) -> bool:
    """The API server's answer names this field path (not merely a longer path that starts with it)."""
    return re.search(rf"(?<![\w.]){re.escape(field)}(?![\w.\[/])", answer) is not None


def names_or_inside(paths: list[str], field: str) -> bool:
    """The parser names the field, or a field inside it (where CEL can name only the parent)."""
    return any(path == field or path.startswith((f"{field}.", f"{field}[")) for path in paths)


@pytest.mark.parametrize("name, field, words", [pytest.param(slug(name), field, words, id=name.removeprefix("crd-"))
                                                for name, _, _, field, words, _ in CRD_CASES])
def test_api_server_rejects_bad_study_naming_the_field(verdicts, name, field, words):
    answer = verdicts[NAMES[name]]
    assert answer is not None, f"accepted: {json.dumps(BODIES[name]['spec'])}"
    assert names_field(answer, field) and words in answer, answer
    assert not any(failure in answer for failure in RULE_FAILED), answer


# The two local-only cases (a YAML syntax error, a wrong kind) cannot become an object the API server judges;
# tests/speechtune/test_spec.py checks their local verdict with every other case.
@pytest.mark.parametrize("case", [case for _, case in SPEC_CASES.values() if not case.local_only], ids=lambda case: case.id)
def test_every_invalid_spec_case_is_judged_alike_by_speechtune_validate_the_operator_and_the_api_server(verdicts, case, tmp_path):
    """The two validators agree: each invalid study of the spec tests is rejected by `speechtune validate` (the
    local parser), by the operator's parser and by the API server (`kubectl apply --dry-run=server`: the CRD's
    schema and CEL rules), each naming the field, and no CEL rule fails to evaluate on it. The case says why
    when only the operator can judge it (operator_only)."""
    local = spec_cases.local_problems(case, tmp_path)
    assert any(path == case.fields[0] and case.words in message for path, message in local), local
    name, body = SPEC_CASES[case.id][0], BODIES[SPEC_CASES[case.id][0]]
    with pytest.raises(spec.SpecError) as error:
        studyspec.parse(copy.deepcopy(body))
    paths = [path for path, _ in error.value.problems]
    assert set(case.fields) <= set(paths) or all(names_or_inside(paths, field) for field in case.api_fields), error.value
    answer = verdicts[NAMES[name]]
    if case.operator_only:
        assert answer is None, f"the CRD now rejects it: drop operator_only ({case.operator_only}):\n{answer}"
        return
    assert answer is not None, f"accepted by the API server: {json.dumps(body['spec'])}"
    assert all(names_field(answer, field) for field in case.api_fields) and case.api_words in answer, answer
    assert not any(failure in answer for failure in RULE_FAILED), answer


VALID_LOCALLY = {  # rejected on a cluster (by the schema or the operator), valid for `speechtune run` by design
    "crd-pending-timeout-zero": "pendingTimeoutSeconds is a cluster-only field",
    "crd-negative-backoff": "trialTemplate.backoffLimit is a cluster-only field",
    "crd-replicas-with-pod-retries": "trialTemplate.backoffLimit is a cluster-only field",
    "crd-template-label-of-the-operator": "trialTemplate.labels is a cluster-only field",
    "crd-negative-keep-trials": "retention is a cluster-only field",
    "crd-template-without-image": "locally the trainer runs on this machine: no image",
    "crd-checkpoints-volume-a-path": "locally the checkpoint volume is a directory",
    "ladder-checkpoint-volume-not-a-pvc-name": "locally the checkpoint volume is a directory",
    "ladder-checkpoints-volume-not-the-ladders": "locally each checkpoint volume is its own directory; a cluster mounts one PVC",
    "stages-two-checkpoint-volumes-in-stages": "locally each checkpoint volume is its own directory; a cluster mounts one PVC",
    "stages-checkpoints-volume-not-the-stages": "locally each checkpoint volume is its own directory; a cluster mounts one PVC",
}
SCHEMA_ONLY = {  # cluster-only fields the operator's parser takes as the API server admitted them (the schema is always there)
    "crd-pending-timeout-zero", "crd-negative-backoff", "crd-negative-keep-trials",
}
CLUSTER_ONLY_FIELDS = {"spec": ("pendingTimeoutSeconds", "retention"),
                       "trialTemplate": ("image", "backoffLimit", "ttlSecondsAfterFinished", "labels"),
                       "storage": ("deleteOnStudyDeletion",)}


@pytest.mark.parametrize("name, example, change, field, parser_field", [pytest.param(*case[:4], case[5] or case[3], id=case[0])
                                                                        for case in CRD_CASES])
def test_the_operators_parser_and_speechtune_validate_reject_what_the_api_server_rejects(name, example, change, field, parser_field,
                                                                                        tmp_path, capsys):
    """Each of the CRD's invalid cases (rejected by `kubectl apply --dry-run=server` above): the operator's parser
    rejects it naming the field (or, where CEL names a parent, a field inside it), and so does `speechtune validate`
    on the same spec without the cluster-only fields, except the VALID_LOCALLY cases, each with its reason."""
    body = crd_case_body(name, example, change)
    if name not in SCHEMA_ONLY:
        with pytest.raises(spec.SpecError) as error:
            studyspec.parse(copy.deepcopy(body))
        assert names_or_inside([path for path, _ in error.value.problems], parser_field), error.value
    local = copy.deepcopy(body)
    for section, fields in CLUSTER_ONLY_FIELDS.items():
        holder = local["spec"] if section == "spec" else local["spec"].get(section, {})
        for one in fields:
            holder.pop(one, None)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(local))
    verdict = cli.main(["validate", str(tmp_path / "study.yaml")])
    printed = capsys.readouterr().out
    if name in VALID_LOCALLY:
        assert verdict == 0, printed
    else:
        paths = re.findall(r"^  (\S+): ", printed, re.M)
        assert verdict == cli.EXIT_INVALID and names_or_inside(paths, parser_field), printed


def test_a_null_field_is_a_field_not_given_for_the_api_server_and_the_parsers_alike(crds, kube_namespace):
    """The API server drops null fields (even in a stage's fixed); the parsers read null as not given too."""
    body = manifest("nulls", STAGED)
    body["spec"].update(fidelity=None, warmStart=None, checkpoints=None)
    body["spec"]["stages"][1].update(sampler=None, fixed={"encoder": None, "num_layers": 4})
    body["spec"]["trialTemplate"]["resources"] = {"limits": {"nvidia.com/gpu": None, "cpu": "1"}, "requests": None}
    result = crds.kubectl("apply", "--dry-run=server", "-n", kube_namespace, "-f", "-", "-o", "json", input=json.dumps(body))
    applied = json.loads(result.stdout)
    assert applied["spec"]["stages"][1]["fixed"] == {"num_layers": 4}
    assert applied["spec"]["trialTemplate"]["resources"] == {"limits": {"cpu": "1"}}
    body["metadata"]["namespace"] = kube_namespace
    assert studyspec.parse(applied) == studyspec.parse(body)  # the operator's parser, which is speechtune validate's


def test_no_cel_rule_fails_to_evaluate_on_any_invalid_case(verdicts):
    """Every CEL rule guards what it reads (has(), size()): the API server never answers with a broken rule."""
    broken = {name: answer for name, answer in verdicts.items() if answer and any(failure in answer for failure in RULE_FAILED)}
    assert not broken, broken


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


def test_a_ladder_with_rank_metrics_and_brackets_is_accepted_and_parsed_alike(crds, kube_namespace):
    body = manifest("ranked-ladder", LADDER)
    body["spec"]["fidelity"]["levels"][0]["rank"] = {"metric": "val_loss", "tieBreak": {"metric": "cer"}}
    body["spec"]["fidelity"]["levels"][1]["rank"] = {"metric": "wer", "direction": "minimize"}
    body["spec"]["fidelity"]["brackets"] = 3
    result = crds.kubectl("apply", "--dry-run=server", "-n", kube_namespace, "-f", "-", "-o", "json", input=json.dumps(body))
    applied = json.loads(result.stdout)
    assert applied["spec"]["fidelity"]["levels"][0]["rank"] == {"metric": "val_loss", "tieBreak": {"metric": "cer"}}  # no defaults
    study, _ = studyspec.parse(applied)
    low, medium, high = study.fidelity.levels
    assert (low.rank.metric, low.rank.tie_break, medium.rank.metric, high.rank) == ("val_loss", "cer", "wer", None)
    assert study.fidelity.bracket_sizes() == [[16, 4, 1], [0, 6, 1], [0, 0, 3]]
    del body["spec"]["fidelity"]["brackets"]
    defaulted = json.loads(crds.kubectl("apply", "--dry-run=server", "-n", kube_namespace, "-f", "-", "-o", "json",
                                        input=json.dumps(body)).stdout)
    assert defaulted["spec"]["fidelity"]["brackets"] == 1


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


def test_the_staged_example_is_accepted_and_parsed_alike(crds, kube_namespace):
    result = crds.kubectl("apply", "--dry-run=server", "-n", kube_namespace, "-f", "-", "-o", "json",
                          input=json.dumps(manifest("good-staged", STAGED)))
    applied = json.loads(result.stdout)
    assert applied["spec"]["stages"][1]["sampler"] == {"type": "random", "seed": 1, "startupTrials": 10}  # defaulted
    assert "topK" not in applied["spec"]["stages"][1], "a kind-specific field must not be defaulted onto every stage"
    study, _ = studyspec.parse(applied)
    assert [(s.name, s.kind) for s in study.stages] == [("baseline", "baseline"), ("coarse", "search"), ("fine", "refine"),
                                                        ("validate", "validate")]


def test_every_stage_field_warm_start_and_checkpoints_together_are_accepted_and_parsed_alike(crds, kube_namespace):
    body = manifest("full-staged", STAGED)
    body["spec"]["stages"] = [
        {"name": "baseline", "kind": "baseline", "params": {"lr": 0.003, "epochs": 2}, "seeds": 2},
        {"name": "coarse", "kind": "search", "maxTrials": 6, "sampler": {"type": "random", "seed": 1},
         "pruner": {"type": "median", "startupTrials": 2}, "fixed": {"encoder": "conformer"},
         "searchSpace": [{"name": "num_layers", "int": {"low": 4, "high": 12}}, {"name": "encoder", "categorical": ["conformer"]},
                         {"name": "lr", "float": {"low": 1e-4, "high": 1e-3, "log": True}}]},
        {"name": "ladder", "kind": "refine", "topK": 3, "margin": 0.2, "pruner": {"type": "none"},
         "fidelity": dict(LOW_HIGH, checkpointVolume="ckpt")},
        {"name": "fine", "kind": "refine", "maxTrials": 4, "sampler": {"type": "tpe", "startupTrials": 2}},
        {"name": "validate", "kind": "validate", "seeds": 3}]
    body["spec"]["warmStart"] = {"study": "source", "storage": {"secretRef": {"name": "db", "key": "url"}}, "topK": 2,
                                 "narrow": {"topK": 5, "margin": 0.1}, "fixed": ["encoder", "num_layers"], "initFrom": "best"}
    body["spec"]["checkpoints"] = {"keepBest": 3, "volume": "ckpt"}
    result = crds.kubectl("apply", "--dry-run=server", "-n", kube_namespace, "-f", "-", "-o", "json", input=json.dumps(body))
    study, options = studyspec.parse(json.loads(result.stdout))
    assert [stage.kind for stage in study.stages] == ["baseline", "search", "refine", "refine", "validate"]
    assert study.max_trials == 2 + 6 + 4 + 4  # the ladder's stage: its initialTrials
    assert (study.warm_start.top_k, study.warm_start.narrow_top_k, study.warm_start.fixed, study.warm_start.init_from) == (
        2, 5, ("encoder", "num_layers"), "best")
    assert (study.checkpoints.keep_best, options.job.checkpoint_claim) == (3, "ckpt")


def applied(crds, namespace: str, body: dict) -> None:
    crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))


WARM = {"study": "source", "topK": 2}


@pytest.mark.parametrize("before, change, field", [
    ({}, stage(1, maxTrials=20), "spec.stages"),
    ({}, stage(2, topK=4), "spec.stages"),
    ({}, setting("spec.stages", STAGED["spec"]["stages"][:2]), "spec.stages"),
    ({}, removing("spec.stages"), "spec.stages"),
    ({"warmStart": WARM}, setting("spec.warmStart.topK", 3), "spec.warmStart"),
    ({"warmStart": WARM}, removing("spec.warmStart"), "spec.warmStart"),
    ({}, setting("spec.warmStart", WARM), "spec.warmStart"),
    ({"checkpoints": {"keepBest": 2}}, setting("spec.checkpoints.keepBest", 5), "spec.checkpoints"),
    ({}, setting("spec.checkpoints", {"keepBest": 2}), "spec.checkpoints"),
    ({"checkpoints": {"keepBest": 2}}, removing("spec.checkpoints"), "spec.checkpoints"),
], ids=["stage-budget", "refine-top-k", "stage-removed", "stages-removed", "warm-start-top-k", "warm-start-removed",
        "warm-start-added", "keep-best", "checkpoints-added", "checkpoints-removed"])
def test_stages_warm_start_and_checkpoints_are_immutable(crds, kube_namespace, before, change, field):
    body = manifest("frozen-staged", STAGED)
    body["spec"].update(before)
    applied(crds, kube_namespace, body)
    change(body)
    result = crds.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0, f"accepted: {json.dumps(body['spec'])}"
    assert field in result.stderr and "is immutable" in result.stderr and "corrupt" in result.stderr, result.stderr


def test_stages_cannot_be_added_to_a_running_study(crds, kube_namespace):
    body = manifest("plain-then-staged")
    body["spec"]["pruner"] = {"type": "none"}
    applied(crds, kube_namespace, body)
    body["spec"]["stages"] = STAGED["spec"]["stages"]
    result = crds.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0
    assert "spec.stages" in result.stderr and "is immutable" in result.stderr, result.stderr


def test_the_budget_fields_and_retention_of_a_staged_study_may_change(crds, kube_namespace):
    body = manifest("staged-budget", STAGED)
    body["spec"].update(warmStart=WARM, checkpoints={"keepBest": 2})
    applied(crds, kube_namespace, body)
    body["spec"].update(maxTrials=50, parallelism=8, maxFailedTrials=10, pendingTimeoutSeconds=60, retention={"keepTrials": 5})
    body["spec"]["trialTemplate"]["args"] = ["--epochs", "3"]
    applied(crds, kube_namespace, body)


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
