"""The CRDs on the real API server: bad manifests are rejected at `kubectl apply` with the field named,
what may not change cannot, and what CEL cannot express becomes a Failed condition with reason InvalidSpec."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from speechtune import cli, spec
from speechtune.k8s import studyspec
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
    ("warm-workers-on-a-cluster", setting("spec.trialTemplate.workers", {"mode": "warm"}), "spec.trialTemplate.workers.mode",
     "warm workers run only with speechtune run"),
    ("workers-unknown-mode", setting("spec.trialTemplate.workers", {"mode": "hot"}), "spec.trialTemplate.workers.mode",
     "Unsupported value"),
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
    ("checkpoint-volume-not-a-pvc-name", setting("spec.fidelity.checkpointVolume", "/scratch/ckpt"),
     "spec.fidelity.checkpointVolume", "should match"),
    ("fidelity-with-a-pruner", setting("spec.pruner", {"type": "median"}), "spec.pruner.type", "must be none with spec.fidelity"),
    ("negative-seeds", setting("spec.validation.seeds", -1), "spec.validation.seeds", "greater than or equal to 0"),
    ("unknown-fidelity-field", setting("spec.fidelity.brackets", 3), "spec.fidelity.brackets", "unknown field"),
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
     "spec.checkpoints.volume", "must be the PVC that fidelity.checkpointVolume names", "spec.stages[1].fidelity.checkpointVolume"),
]


@pytest.mark.parametrize("example, change, field, words",
                         [(EXAMPLE, *case[1:]) for case in BAD] + [(LADDER, *case[1:]) for case in BAD_LADDERS]
                         + [(STAGED, *case[1:4]) for case in BAD_STAGES],
                         ids=[case[0] for case in BAD] + [f"ladder-{case[0]}" for case in BAD_LADDERS]
                         + [f"stages-{case[0]}" for case in BAD_STAGES])
def test_api_server_rejects_bad_study_naming_the_field(crds, kube_namespace, example, change, field, words):
    body = manifest(example=example)
    change(body)
    result = crds.kubectl("apply", "--dry-run=server", "-n", kube_namespace, "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0, f"accepted: {json.dumps(body['spec'])}"
    assert field in result.stderr and words in result.stderr, result.stderr


@pytest.mark.parametrize("change, field", [pytest.param(case[1], case[4], id=case[0])
                                           for case in BAD_STAGES])
def test_the_operators_parser_rejects_the_same_staged_manifests(change, field):
    """The CRD and speechtune.spec agree: what CEL rejects in stages, the parser rejects too (on a file or a
    CRD installed without its rules), naming the field (the parser names a list index where CEL cannot)."""
    body = manifest(example=STAGED)
    change(body)
    with pytest.raises(spec.SpecError) as error:
        studyspec.parse(body)
    assert field in [path for path, _ in error.value.problems], error.value


NEW_FIELDS = ("warm-start-", "checkpoints-", "warm-workers-", "workers-")  # the spec fields added with stages, warm start, workers
LOCAL_ONLY = {  # valid for `speechtune run` (and `speechtune validate`), refused on a cluster by CEL and the operator alike
    "warm-workers-on-a-cluster": "warm workers are local processes",
    "checkpoints-volume-a-path": "locally the checkpoint volume is a directory",
}


@pytest.mark.parametrize("change, field", [pytest.param(case[1], case[2], id=case[0]) for case in BAD
                                           if case[0].startswith(NEW_FIELDS)])
def test_the_operators_parser_and_speechtune_validate_judge_the_new_fields_as_the_api_server_does(change, field, tmp_path, capsys):
    """Each invalid case of the new fields that `kubectl apply --dry-run=server` rejects (above), the operator's
    parser rejects naming the same field; `speechtune validate` on the same spec (cluster-only fields removed)
    rejects it too, except the LOCAL_ONLY cases, which are valid locally by design."""
    body = manifest(example=EXAMPLE)
    change(body)
    with pytest.raises(spec.SpecError) as error:
        studyspec.parse(copy.deepcopy(body))
    assert field in [path for path, _ in error.value.problems], error.value
    local = copy.deepcopy(body)
    for name in ("pendingTimeoutSeconds", "retention"):
        local["spec"].pop(name, None)
    for name in ("image", "backoffLimit", "ttlSecondsAfterFinished"):
        local["spec"]["trialTemplate"].pop(name, None)
    local["spec"].get("storage", {}).pop("deleteOnStudyDeletion", None)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(local))
    verdict = cli.main(["validate", str(tmp_path / "study.yaml")])
    name = next(case[0] for case in BAD if case[1] is change)
    if name in LOCAL_ONLY:
        assert verdict == 0
    else:
        assert verdict == cli.EXIT_INVALID and f"  {field}: " in capsys.readouterr().out


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
