import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from speechtune import cli, spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def manifest(**spec_overrides):
    body = {
        "objective": {"metric": "wer", "direction": "minimize"},
        "maxTrials": 10,
        "parallelism": 2,
        "sampler": {"type": "tpe", "seed": 1},
        "pruner": {"type": "hyperband", "minResource": 1, "maxResource": 9, "reductionFactor": 3},
        "searchSpace": [
            {"name": "lr", "float": {"low": 1e-5, "high": 1e-3, "log": True}},
            {"name": "num_layers", "int": {"low": 2, "high": 12}},
            {"name": "encoder", "categorical": ["conformer", "lstm"]},
        ],
        "trialTemplate": {"command": ["python", "-m", "speechtune.fake_trainer"], "args": ["--epochs", "9"]},
    }
    body.update(spec_overrides)
    body = {key: value for key, value in body.items() if value is not None}
    return {"apiVersion": spec.API_VERSION, "kind": spec.KIND, "metadata": {"name": "study-a"}, "spec": body}


def problems_of(document):
    with pytest.raises(spec.SpecError) as caught:
        spec.parse_study(document)
    return caught.value.problems


def test_valid_manifest_parses_into_typed_params():
    study = spec.parse_study(manifest())
    assert study.name == "study-a"
    assert study.search_space == (
        spec.FloatParam("lr", 1e-5, 1e-3, None, True),
        spec.IntParam("num_layers", 2, 12, 1, False),
        spec.CategoricalParam("encoder", ("conformer", "lstm")),
    )
    assert study.pruner.max_resource == 9


def test_espnet_shorthand_is_a_map_of_categoricals():
    study = spec.parse_study(manifest(searchSpace=None, search_space={"encoder_layers": [4, 6, 8, 12], "dropout": [0.1, 0.2, 0.3]}))
    assert study.search_space == (
        spec.CategoricalParam("encoder_layers", (4, 6, 8, 12)),
        spec.CategoricalParam("dropout", (0.1, 0.2, 0.3)),
    )


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_study_is_valid(path):
    document = yaml.safe_load(path.read_text())
    if document.get("kind") == spec.KIND:
        spec.parse_study(document)


PARAM = {"name": "p", "float": {"low": 0.1, "high": 1.0}}
LOW, HIGH = {"name": "low", "overrides": {"epochs": 1}}, {"name": "high", "overrides": {"epochs": 9}}
REMOVE = object()


def put(dotted: str, value):
    """A change: set the value at a dotted path of the manifest (list indexes as numbers; REMOVE deletes it)."""
    def change(document):
        *parents, last = dotted.split(".")
        node = document
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        key = int(last) if isinstance(node, list) else last
        if value is REMOVE:
            del node[key]
        else:
            node[key] = copy.deepcopy(value)
    return change


def changes(*each):
    def change(document):
        for one in each:
            one(document)
    return change


def space(*params):
    return put("spec.searchSpace", list(params))


def ladder(levels=(LOW, HIGH), **fields):
    """spec.fidelity (with pruner none, as a ladder needs): two levels, eta 2, 4 configurations, then fields."""
    return changes(put("spec.pruner", {"type": "none"}),
                   put("spec.fidelity", {"levels": list(levels), "reductionFactor": 2, "initialTrials": 4, **fields}))


def template(**fields):
    return put("spec.trialTemplate", {"command": ["python", "-m", "speechtune.fake_trainer"], **fields})


def staged(*stages):
    return put("spec.stages", [{"name": "baseline", "kind": "baseline"}, *stages])


COARSE = {"name": "coarse", "kind": "search", "maxTrials": 4}
FINE = {"name": "fine", "kind": "refine", "maxTrials": 4}
GPU = "nvidia.com/gpu"
ENCODER = {"name": "encoder", "categorical": ["conformer", "lstm"]}
CHILD = {"name": "heads", "int": {"low": 2, "high": 8}}


def conditional(when):
    """manifest()'s space with a conditional parameter (heads, when ...) appended at [3]."""
    return lambda document: document["spec"]["searchSpace"].append({**CHILD, "when": copy.deepcopy(when)})


NOT_A_MAP_KEY = ("CEL cannot see the keys (or the untyped values) of such a map, and a structural schema has no propertyNames: "
                 "the API server admits it, the operator's parser fails the study with reason InvalidSpec")


@dataclass(frozen=True)
class Invalid:
    """One invalid study: a change to manifest() and the field the local parser (`speechtune validate`) names.

    tests/speechtune/k8s/test_crd.py sends every case, in the Kubernetes form, through `kubectl apply
    --dry-run=server` and the operator's parser: the API server must reject it naming api_field (default: the
    same field; CEL often can name only a parent), unless the case says why it cannot be judged there:
    local_only (only a study file can carry it) or operator_only (the CRD cannot express the check; the
    API server admits it and the operator fails the study with reason InvalidSpec, naming the field).
    """

    id: str
    change: Callable[[dict], object]
    field: str | tuple[str, ...]
    words: str = ""  # in the local message for the first field
    api_field: str | tuple[str, ...] | None = None
    api_words: str = ""  # in the API server's answer
    only: bool = False  # the local parser names these fields and no other
    local_only: str = ""
    operator_only: str = ""
    text: str | None = None  # a study file's text (a local_only case), instead of a change to manifest()

    @property
    def fields(self) -> tuple[str, ...]:
        return (self.field,) if isinstance(self.field, str) else self.field

    @property
    def api_fields(self) -> tuple[str, ...]:
        named = self.field if self.api_field is None else self.api_field
        return (named,) if isinstance(named, str) else named

    def manifest(self) -> dict:
        document = manifest()
        self.change(document)
        return document


# Every invalid study of the spec tests, judged alike by speechtune validate, the operator's parser and the
# API server (the CRD's schema and CEL rules); the "... preconditions" cases break what a CEL rule reads
# (an empty list it indexes, a field it needs), so that the API server's answer is an error a user can act on.
INVALID = [
    Invalid("low above high", space({"name": "lr", "float": {"low": 1.0, "high": 0.1}}),
            "spec.searchSpace[0].float.low", "must be <= high"),
    Invalid("log with low zero", space({"name": "lr", "float": {"low": 0, "high": 0.1, "log": True}}),
            "spec.searchSpace[0].float.low", "must be > 0 when log is true"),
    Invalid("empty categorical", space({"name": "encoder", "categorical": []}), "spec.searchSpace[0].categorical", "non-empty list"),
    Invalid("duplicate names", space(PARAM, PARAM), "spec.searchSpace[1].name", "duplicate parameter name 'p'",
            api_field="spec.searchSpace[1]", api_words="Duplicate value"),
    Invalid("unknown sampler", put("spec.sampler", {"type": "bayes"}), "spec.sampler.type", "unknown value 'bayes'"),
    Invalid("unknown pruner", put("spec.pruner", {"type": "asha"}), "spec.pruner.type", "unknown value 'asha'"),
    Invalid("parallelism zero", put("spec.parallelism", 0), "spec.parallelism", "must be >= 1"),
    Invalid("min resource above max", put("spec.pruner", {"type": "hyperband", "minResource": 10, "maxResource": 3}),
            "spec.pruner.minResource", "must be <= maxResource"),
    Invalid("hyperband without max resource", put("spec.pruner", {"type": "hyperband"}), "spec.pruner.maxResource",
            "is required for hyperband"),
    Invalid("max trials not a number", put("spec.maxTrials", "many"), "spec.maxTrials", "must be an integer"),
    Invalid("unknown direction", put("spec.objective", {"metric": "wer", "direction": "down"}), "spec.objective.direction",
            "unknown value 'down'"),
    Invalid("two kinds in one param", space({"name": "p", "int": {"low": 1, "high": 2}, "float": {"low": 1, "high": 2}}),
            "spec.searchSpace[0]", "exactly one of int, float or categorical"),
    Invalid("fractional int bound", space({"name": "p", "int": {"low": 1.5, "high": 4}}), "spec.searchSpace[0].int.low", "whole number"),
    Invalid("negative step", space({"name": "p", "int": {"low": 1, "high": 4, "step": -1}}), "spec.searchSpace[0].int.step", "must be > 0"),
    Invalid("step with log", space({"name": "p", "float": {"low": 0.1, "high": 1, "step": 0.1, "log": True}}),
            "spec.searchSpace[0].float.step", "cannot be combined with log"),
    Invalid("bad param name", space({"name": "learning rate", "float": {"low": 0.1, "high": 1}}), "spec.searchSpace[0].name",
            "must be an identifier"),
    Invalid("missing command", put("spec.trialTemplate", {"args": ["--x"]}), "spec.trialTemplate.command", "is required"),
    Invalid("missing search space", put("spec.searchSpace", REMOVE), "spec.searchSpace", "is required"),
    Invalid("unknown spec field", put("spec.maxTrail", 3), "spec.maxTrail", "unknown field"),
    Invalid("storage url without scheme", put("spec.storage", {"url": "speechtune.db"}), "spec.storage.url", "must be a database URL"),
    Invalid("grid over a continuous float", changes(put("spec.sampler", {"type": "grid"}), space(PARAM)),
            "spec.searchSpace[0].float", "grid sampler needs a step", api_field="spec.searchSpace"),
    Invalid("categorical choice is a mapping", space({"name": "p", "categorical": [{"a": 1}]}),
            "spec.searchSpace[0].categorical[0]", "must be strings, numbers"),
    Invalid("categorical choice is a list", space({"name": "p", "categorical": ["a", [1, 2]]}),
            "spec.searchSpace[0].categorical[1]", "must be strings, numbers"),
    Invalid("categorical choice is an empty mapping", space({"name": "p", "categorical": [{}]}),
            "spec.searchSpace[0].categorical[0]", "must be strings, numbers"),
    Invalid("duplicate categorical choices", space({"name": "p", "categorical": ["a", "a"]}), "spec.searchSpace[0].categorical",
            "duplicate choices", operator_only="CEL cannot see the choices (they are untyped), and x-kubernetes-list-type: set would "
            "make their order not matter to the API server, while the index of each choice is what Optuna stores"),
    Invalid("reduction factor one", put("spec.pruner", {"type": "successiveHalving", "reductionFactor": 1}),
            "spec.pruner.reductionFactor", "must be >= 2"),
    Invalid("shorthand with empty list", changes(put("spec.searchSpace", REMOVE), put("spec.search_space", {"dropout": []})),
            "spec.search_space.dropout.categorical", "non-empty list", api_field="spec.searchSpace[0].categorical"),
    Invalid("secretRef without key", put("spec.storage", {"secretRef": {"name": "db"}}), "spec.storage.secretRef.key", "is required"),
    Invalid("empty secretRef", put("spec.storage", {"secretRef": {}}), ("spec.storage.secretRef.name", "spec.storage.secretRef.key"),
            "is required"),
    Invalid("every problem at once", changes(put("spec.parallelism", 0), put("spec.maxTrials", 0), put("spec.sampler", {"type": "bayes"})),
            ("spec.parallelism", "spec.maxTrials", "spec.sampler.type"), only=True),
    Invalid("bad study name", put("metadata.name", "Has_Capitals"), "metadata.name", "lowercase letters, digits and '-'", only=True),
    Invalid("dotted study name", put("metadata.name", "study.a"), "metadata.name", "lowercase letters, digits and '-'", only=True),
    Invalid("wrong kind", put("kind", "Study"), "kind", "must be 'SpeechTuningStudy'", only=True,
            local_only="on a cluster apiVersion and kind choose the resource: kubectl finds none for kind Study, before any validation"),
    Invalid("yaml syntax error", lambda document: None, "<file>", "not valid YAML", text="spec: [unclosed\n",
            local_only="a syntax error is in the file's text: kubectl cannot parse it into an object to send"),
    # workers
    Invalid("workers unknown mode", template(workers={"mode": "hot"}), "spec.trialTemplate.workers.mode",
            "unknown value 'hot'; expected one of: cold, warm"),
    Invalid("workers zero runs", template(workers={"mode": "warm", "maxRunsPerWorker": 0}), "spec.trialTemplate.workers.maxRunsPerWorker",
            "must be >= 1"),
    Invalid("workers runs not a number", template(workers={"mode": "warm", "maxRunsPerWorker": "many"}),
            "spec.trialTemplate.workers.maxRunsPerWorker", "must be an integer"),
    Invalid("workers zero grace", template(workers={"mode": "warm", "stopGraceSeconds": 0}), "spec.trialTemplate.workers.stopGraceSeconds",
            "must be > 0"),
    Invalid("workers grace not a number", template(workers={"mode": "warm", "stopGraceSeconds": "10s"}),
            "spec.trialTemplate.workers.stopGraceSeconds", "must be a finite number"),
    Invalid("workers fractional rss", template(workers={"mode": "warm", "maxRssMiB": 0.5}), "spec.trialTemplate.workers.maxRssMiB",
            "must be an integer"),
    Invalid("workers negative gpu memory", template(workers={"mode": "warm", "maxGpuMiB": -1}), "spec.trialTemplate.workers.maxGpuMiB",
            "must be >= 1"),
    Invalid("workers unknown field", template(workers={"mode": "warm", "reuse": True}), "spec.trialTemplate.workers.reuse", "unknown field"),
    Invalid("workers not a mapping", template(workers="warm"), "spec.trialTemplate.workers", "must be a mapping"),
    # resources: amounts >= 0, GPU counts whole
    Invalid("negative gpu limit", template(resources={"limits": {GPU: -1}}), f"spec.trialTemplate.resources.limits[{GPU}]",
            "must be >= 0"),
    Invalid("negative gpu limit as a string", template(resources={"limits": {GPU: "-1"}}), f"spec.trialTemplate.resources.limits[{GPU}]",
            "must be >= 0"),
    Invalid("negative gpu request", template(resources={"requests": {GPU: -2}, "limits": {GPU: 1}}),
            f"spec.trialTemplate.resources.requests[{GPU}]", "must be >= 0", only=True),
    Invalid("fractional gpu limit", template(resources={"limits": {GPU: "500m"}}), f"spec.trialTemplate.resources.limits[{GPU}]",
            "whole number of GPUs", api_field="spec.trialTemplate.resources.limits", api_words=GPU),
    Invalid("fractional amd gpu request", template(resources={"requests": {"amd.com/gpu": "1.5"}}),
            "spec.trialTemplate.resources.requests[amd.com/gpu]", "whole number of GPUs",
            api_field="spec.trialTemplate.resources.requests", api_words="whole number of GPUs"),
    Invalid("gpu limit a decimal number", template(resources={"limits": {GPU: 1.5}}), f"spec.trialTemplate.resources.limits[{GPU}]",
            "must be an integer or a quantity", api_field=f"spec.trialTemplate.resources.limits.{GPU}"),
    Invalid("gpu limit not a quantity (gpu rule preconditions)", template(resources={"limits": {GPU: "two"}}),
            f"spec.trialTemplate.resources.limits[{GPU}]", "must be an integer or a quantity", api_words="must be an integer or a quantity"),
    Invalid("negative cpu request", template(resources={"requests": {"cpu": "-500m"}}), "spec.trialTemplate.resources.requests[cpu]",
            "must be >= 0"),
    Invalid("memory not a quantity", template(resources={"limits": {"memory": "16 GB"}}), "spec.trialTemplate.resources.limits[memory]",
            "must be an integer or a quantity"),
    Invalid("unknown resources field", template(resources={"limit": {GPU: 1}}), "spec.trialTemplate.resources.limit", "unknown field"),
    Invalid("quantity too long", template(resources={"limits": {"memory": "1" * 65}}), "spec.trialTemplate.resources.limits[memory]",
            "at most 64 characters", api_field="spec.trialTemplate.resources.limits.memory", api_words="Too long"),
    Invalid("too many resources", template(resources={"limits": {f"example.com/r{i}": 1 for i in range(33)}}),
            "spec.trialTemplate.resources.limits", "at most 32"),
    # env
    Invalid("env without value", template(env=[{"name": "A"}]), "spec.trialTemplate.env[0].value", "is required"),
    Invalid("env with an empty name", template(env=[{"name": "", "value": "x"}]), "spec.trialTemplate.env[0].name", "is required"),
    Invalid("duplicate env names", template(env=[{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
            "spec.trialTemplate.env[1].name", "duplicate variable 'A'", api_field="spec.trialTemplate.env[1]", api_words="Duplicate value"),
    Invalid("env entry with valueFrom", template(env=[{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]),
            ("spec.trialTemplate.env[0].valueFrom", "spec.trialTemplate.env[0].value"), "unknown field",
            api_field="spec.trialTemplate.env[0].valueFrom"),
    Invalid("env value not a string", template(env={"A": 1}), "spec.trialTemplate.env", "must map names to string values",
            api_field="spec.trialTemplate.env[0].value"),
    # bounds the CRD sets
    Invalid("metric name too long", put("spec.objective", {"metric": "m" * 64}), "spec.objective.metric", "at most 63"),
    Invalid("parameter name too long", space({"name": "p" * 64, "int": {"low": 1, "high": 2}}), "spec.searchSpace[0].name", "at most 63"),
    Invalid("too many parameters", space(*({"name": f"p{i}", "int": {"low": 1, "high": 2}} for i in range(65))), "spec.searchSpace",
            "at most 64"),
    Invalid("too many categorical choices", space({"name": "p", "categorical": list(range(257))}), "spec.searchSpace[0].categorical",
            "at most 256"),
    Invalid("storage url scheme with a space", put("spec.storage", {"url": "my db://host/x"}), "spec.storage.url", "must be a database URL"),
    # the fidelity ladder
    Invalid("level name with a space", ladder([{"name": "low fi", "overrides": {"epochs": 1}}, HIGH]), "spec.fidelity.levels[0].name",
            "lowercase letters, digits and '-'"),
    Invalid("level name in capitals", ladder([LOW, {"name": "High", "overrides": {"epochs": 9}}]), "spec.fidelity.levels[1].name",
            "lowercase letters, digits and '-'"),
    Invalid("level name too long", ladder([LOW, {"name": "h" * 21, "overrides": {"epochs": 9}}]), "spec.fidelity.levels[1].name",
            "at most 20 characters"),
    Invalid("level without a name", ladder([LOW, {"overrides": {"epochs": 9}}]), "spec.fidelity.levels[1].name", "is required"),
    Invalid("duplicate level names", ladder([LOW, LOW]), "spec.fidelity.levels[1].name", "duplicate level name 'low'",
            api_field="spec.fidelity.levels[1]", api_words="Duplicate value"),
    Invalid("override value an object", ladder([LOW, {"name": "high", "overrides": {"epochs": {"max": 9}}}]),
            "spec.fidelity.levels[1].overrides.epochs", "must be a string, number or boolean"),
    Invalid("override value a list", ladder([LOW, {"name": "high", "overrides": {"epochs": [9]}}]),
            "spec.fidelity.levels[1].overrides.epochs", "must be a string, number or boolean"),
    Invalid("override name not a parameter name", ladder([LOW, {"name": "high", "overrides": {"train-hours": 10}}]),
            "spec.fidelity.levels[1].overrides.train-hours", "must be a parameter name", operator_only=NOT_A_MAP_KEY),
    Invalid("too many overrides", ladder([LOW, {"name": "high", "overrides": {f"o{i}": 1 for i in range(65)}}]),
            "spec.fidelity.levels[1].overrides", "at most 64"),
    # a level's rank metric and its tie-break (the objective here is wer)
    Invalid("unknown rank metric", ladder([dict(LOW, rank={"metric": "val_los"}), HIGH]), "spec.fidelity.levels[0].rank.metric",
            "unknown rank metric 'val_los'", api_field="spec.fidelity.levels", api_words="must be wer, cer, val_loss or the objective's metric"),
    Invalid("rank metric an unreported metric", ladder([dict(LOW, rank={"metric": "epoch_seconds"}), HIGH]),
            "spec.fidelity.levels[0].rank.metric", "unknown rank metric 'epoch_seconds'", api_field="spec.fidelity.levels",
            api_words="must be wer, cer, val_loss or the objective's metric"),
    Invalid("empty rank metric", ladder([dict(LOW, rank={"metric": ""}), HIGH]), "spec.fidelity.levels[0].rank.metric", "is required",
            api_words="should match"),
    Invalid("unknown tie-break metric", ladder([dict(LOW, rank={"metric": "val_loss", "tieBreak": {"metric": "loss"}}), HIGH]),
            "spec.fidelity.levels[0].rank.tieBreak.metric", "unknown rank metric 'loss'", api_field="spec.fidelity.levels",
            api_words="must be wer, cer, val_loss or the objective's metric"),
    Invalid("tie-break equal to the rank metric", ladder([LOW, dict(HIGH, rank={"metric": "cer", "tieBreak": {"metric": "cer"}})]),
            "spec.fidelity.levels[1].rank.tieBreak.metric", "must differ from rank.metric ('cer')", api_words="must differ from rank.metric"),
    Invalid("unknown rank direction", ladder([dict(LOW, rank={"metric": "cer", "direction": "down"}), HIGH]),
            "spec.fidelity.levels[0].rank.direction", "unknown value 'down'", api_words="Unsupported value"),
    Invalid("unknown rank field", ladder([dict(LOW, rank={"metric": "cer", "secondary": "wer"}), HIGH]),
            "spec.fidelity.levels[0].rank.secondary", "unknown field"),
    Invalid("stage ladder with an unknown rank metric",
            staged({"name": "coarse", "kind": "search", "pruner": {"type": "none"},
                    "fidelity": {"levels": [dict(LOW, rank={"metric": "bleu"}), HIGH], "reductionFactor": 2, "initialTrials": 4}}),
            "spec.stages[1].fidelity.levels[0].rank.metric", "unknown rank metric 'bleu'", api_field="spec.stages",
            api_words="must be wer, cer, val_loss or the objective's metric"),
    Invalid("stage ladder tie-break equal to the rank metric",
            staged({"name": "coarse", "kind": "search", "pruner": {"type": "none"}, "fidelity": {
                "levels": [dict(LOW, rank={"metric": "val_loss", "tieBreak": {"metric": "val_loss"}}), HIGH],
                "reductionFactor": 2, "initialTrials": 4}}),
            "spec.stages[1].fidelity.levels[0].rank.tieBreak.metric", "must differ from rank.metric"),
    Invalid("rank metric of another objective", changes(put("spec.objective", {"metric": "mcd"}),
                                                        ladder([dict(LOW, rank={"metric": "wer", "tieBreak": {"metric": "bleu"}}), HIGH])),
            "spec.fidelity.levels[0].rank.tieBreak.metric", "or the objective's metric ('mcd')", api_field="spec.fidelity.levels",
            api_words="must be wer, cer, val_loss or the objective's metric"),
    # Hyperband brackets
    Invalid("more brackets than levels", ladder(brackets=3), "spec.fidelity.brackets", "must be <= the number of levels (2)"),
    Invalid("zero brackets", ladder(brackets=0), "spec.fidelity.brackets", "must be >= 1", api_words="greater than or equal to 1"),
    Invalid("stage ladder with more brackets than levels",
            staged({"name": "coarse", "kind": "search", "pruner": {"type": "none"},
                    "fidelity": {"levels": [LOW, HIGH], "reductionFactor": 2, "initialTrials": 4, "brackets": 4}}),
            "spec.stages[1].fidelity.brackets", "must be <= the number of levels"),
    Invalid("seven levels", ladder([{"name": f"l{i}"} for i in range(7)], initialTrials=64), "spec.fidelity.levels", "2 to 6 levels",
            api_words="must have at most 6 items"),
    Invalid("ladder reduction factor above 64", ladder(reductionFactor=65, initialTrials=65), "spec.fidelity.reductionFactor",
            "must be <= 64"),
    Invalid("ladder initial trials above 100000", ladder(initialTrials=100001), "spec.fidelity.initialTrials", "must be <= 100000"),
    Invalid("validation seeds above 32", changes(ladder(), put("spec.validation", {"seeds": 33})), "spec.validation.seeds",
            "must be <= 32"),
    # stages and warm start
    Invalid("seventeen stages", staged(*({"name": f"s{i}", "kind": "search", "maxTrials": 1} for i in range(16))), "spec.stages",
            "at most 16"),
    Invalid("stage seeds above 32", staged(COARSE, {"name": "check", "kind": "validate", "seeds": 33}), "spec.stages[2].seeds",
            "must be <= 32"),
    Invalid("refine top k above 1000", staged(COARSE, dict(FINE, topK=1001)), "spec.stages[2].topK", "must be <= 1000"),
    Invalid("stage fixed value an object", staged(dict(COARSE, fixed={"encoder": {"name": "lstm"}})), "spec.stages[1].fixed.encoder",
            "must be a string, number or boolean", operator_only="a stage's fixed stays an untyped object so that CEL sees it for the "
            "stage-kind rules; typing its values would hide it from them"),
    Invalid("stage fixed name not a parameter name", staged(dict(COARSE, fixed={"num-layers": 4})), "spec.stages[1].fixed.num-layers",
            "must be a parameter name", operator_only=NOT_A_MAP_KEY),
    Invalid("region choices outside the space", staged(dict(COARSE, searchSpace=[{"name": "encoder", "categorical": ["gru"]}])),
            "spec.stages[1].searchSpace[0].categorical", "are not in spec.searchSpace",
            operator_only="CEL cannot see categorical choices (they are untyped)"),
    # conditional parameters (when): manifest()'s space is lr, num_layers, encoder [conformer, lstm]; the child is [3]
    Invalid("when names an unknown parent", conditional({"decoder": ["ctc"]}), "spec.searchSpace[3].when.decoder",
            "unknown parameter 'decoder'", api_field="spec.searchSpace", api_words="names a parent that is not in spec.searchSpace"),
    Invalid("when on an int parent", conditional({"num_layers": [4]}), "spec.searchSpace[3].when.num_layers",
            "must be a categorical parameter, it is an int one", api_field="spec.searchSpace",
            api_words="must be a categorical parameter, not an int or float one"),
    Invalid("when on a float parent", conditional({"lr": [1]}), "spec.searchSpace[3].when.lr",
            "must be a categorical parameter, it is a float one", api_field="spec.searchSpace",
            api_words="must be a categorical parameter, not an int or float one"),
    Invalid("when choice not among the parent's", conditional({"encoder": ["conformer", "gru"]}),
            "spec.searchSpace[3].when.encoder[1]", "'gru' is not a choice of 'encoder'",
            operator_only="CEL cannot see categorical choices (they are untyped)"),
    Invalid("conditional on itself", space({"name": "heads", "categorical": ["a", "b"], "when": {"heads": ["a"]}}),
            "spec.searchSpace[0].when.heads", "cannot be conditional on itself", api_field="spec.searchSpace",
            api_words="a parent must be listed before its children"),
    Invalid("parent listed after its child", space({**CHILD, "when": {"encoder": ["conformer"]}}, ENCODER),
            "spec.searchSpace[0].when.encoder", "must be listed before 'heads'", api_field="spec.searchSpace",
            api_words="a parent must be listed before its children"),
    Invalid("a cycle of two", space(dict(ENCODER, when={"kind": ["abs"]}), {"name": "kind", "categorical": ["abs", "rel"],
                                                                           "when": {"encoder": ["conformer"]}}),
            "spec.searchSpace[0].when.kind", "must be listed before 'encoder'", api_field="spec.searchSpace",
            api_words="a parent must be listed before its children"),
    Invalid("when choice a boolean", conditional({"encoder": [True]}), "spec.searchSpace[3].when.encoder[0]",
            "must be a string or an integer", api_words="must be of type"),
    Invalid("when an empty map", conditional({}), "spec.searchSpace[3].when", "must map parent parameters",
            api_words="should have at least 1 properties"),
    Invalid("when an empty list", conditional({"encoder": []}), "spec.searchSpace[3].when.encoder", "must be a non-empty list",
            api_words="should have at least 1 items"),
    Invalid("when with nine parents", space(*({"name": f"c{i}", "categorical": ["a"]} for i in range(9)),
                                            dict(CHILD, when={f"c{i}": ["a"] for i in range(9)})),
            "spec.searchSpace[9].when", "at most 8 parents", api_words="must have at most 8 items"),
    Invalid("grid over a conditional space", changes(put("spec.sampler", {"type": "grid"}), put("spec.pruner", {"type": "none"}),
                                                     space(ENCODER, {**CHILD, "when": {"encoder": ["conformer"]}})),
            "spec.sampler.type", "the grid sampler needs a fixed search space"),
    Invalid("stage grid over a conditional space", changes(conditional({"encoder": ["conformer"]}),
                                                           staged(dict(COARSE, sampler={"type": "grid"}))),
            "spec.stages[1].sampler.type", "the grid sampler needs a fixed search space", api_field="spec.stages"),
    Invalid("when in a stage's region", staged(dict(COARSE, searchSpace=[{**CHILD, "name": "num_layers",
                                                                          "when": {"encoder": ["conformer"]}}])),
            "spec.stages[1].searchSpace[0].when", "unknown field", api_field="spec.stages[1].searchSpace",
            api_words="a region of spec.searchSpace has no conditions"),
    Invalid("a handoff from a stage that does not exist",
            staged(dict(COARSE, handoff={"from": ["acoustic"], "params": True})),
            "spec.stages[1].handoff.from", "earlier baseline, search or refine stages", api_field="spec.stages",
            api_words="handoff.from must name other stages"),
    Invalid("a handoff from a later stage", staged(dict(COARSE, handoff={"from": ["fine"], "params": True}), FINE),
            "spec.stages[1].handoff.from", "earlier baseline, search or refine stages",
            operator_only="CEL sees a list's items, not their order"),
    Invalid("a handoff that does nothing", staged(dict(COARSE, handoff={"from": ["baseline"]})),
            "spec.stages[1].handoff", "does nothing", api_words="does nothing"),
    Invalid("a checkpoint handoff without kept checkpoints",
            staged(dict(COARSE, handoff={"from": ["baseline"], "checkpointFlag": "acoustic_checkpoint"})),
            "spec.stages[1].handoff.checkpointFlag", "needs spec.checkpoints.keepBest >= 1", api_field="spec.checkpoints.keepBest",
            api_words="must be >= 1 when a stage's handoff passes a checkpoint"),
    Invalid("a stage's own trainer without its search space",
            staged(dict(COARSE, trialTemplate={"image": "vocoder:1", "command": ["speechtune-trainer", "tts-vocoder"]})),
            "spec.stages[1].searchSpace", "is required with a stage's own trialTemplate", api_words="is required with a stage's own trialTemplate"),
    Invalid("a stage's own trainer without a command",
            staged(dict(COARSE, trialTemplate={"args": ["--epochs", "2"]}, searchSpace=[CHILD])),
            "spec.stages[1].trialTemplate.command", "is required", api_words="Required value"),
    Invalid("a stage's own trainer with warm workers",
            changes(template(image="trainer:1", workers={"mode": "warm"}),
                    staged(dict(COARSE, trialTemplate={"command": ["speechtune-trainer", "tts-vocoder"]}, searchSpace=[CHILD]))),
            "spec.stages[1].trialTemplate", "a warm worker runs the study's command", api_field="spec.stages",
            api_words="a warm worker runs the study's command"),
    Invalid("a checkpoint flag that is not a flag name",
            changes(put("spec.checkpoints", {"keepBest": 1}),
                    staged(dict(COARSE, handoff={"from": ["baseline"], "checkpointFlag": "acoustic-checkpoint"}))),
            "spec.stages[1].handoff.checkpointFlag", "must be a flag name", api_words="should match"),
    Invalid("a checkpoint flag that the stage also samples",
            changes(put("spec.checkpoints", {"keepBest": 1}),
                    staged(dict(COARSE, trialTemplate={"command": ["speechtune-trainer", "tts-vocoder"]}, searchSpace=[CHILD],
                                handoff={"from": ["baseline"], "checkpointFlag": "heads"}))),
            "spec.stages[1].handoff.checkpointFlag", "also a parameter", api_words="is also a parameter this stage samples"),
    Invalid("handoff params that is not a boolean", staged(dict(COARSE, handoff={"from": ["baseline"], "params": "yes"})),
            "spec.stages[1].handoff.params", "must be true or false", api_words="must be of type boolean"),
    Invalid("a baseline with a search space but no trainer of its own",
            put("spec.stages", [{"name": "baseline", "kind": "baseline", "searchSpace": [CHILD]}]),
            "spec.stages[0].searchSpace", "own trialTemplate", api_words="or a baseline with its own trialTemplate"),
    Invalid("a refine stage with its own trainer",
            staged(COARSE, dict(FINE, trialTemplate={"command": ["speechtune-trainer", "tts-vocoder"]})),
            "spec.stages[2].trialTemplate", "unknown field", api_words="is only for a baseline or search stage"),
    Invalid("baseline params with a conditional parameter whose condition is false",
            changes(conditional({"encoder": ["conformer"]}), put("spec.stages", [{"name": "baseline", "kind": "baseline", "params": {
                "encoder": "lstm", "heads": 4}}])),
            "spec.stages[0].params.heads", "applies only when encoder in ['conformer']",
            operator_only="a stage's params stays an untyped object (as its fixed), so CEL cannot see its values"),
    Invalid("warm start study name too long", put("spec.warmStart", {"study": "s" * 513, "topK": 1}), "spec.warmStart.study",
            "at most 512"),
    Invalid("warm start top k above 1000", put("spec.warmStart", {"study": "source", "topK": 1001}), "spec.warmStart.topK",
            "must be <= 1000"),
    Invalid("warm start narrow top k above 1000", put("spec.warmStart", {"study": "source", "narrow": {"topK": 1001}}),
            "spec.warmStart.narrow.topK", "must be <= 1000"),
    Invalid("warm start duplicate fixed names", put("spec.warmStart", {"study": "source", "fixed": ["encoder", "encoder"]}),
            "spec.warmStart.fixed[1]", "duplicate name 'encoder'", api_words="Duplicate value"),
    Invalid("warm start fixed name too long", put("spec.warmStart", {"study": "source", "fixed": ["f" * 64]}), "spec.warmStart.fixed[0]",
            "at most 63"),
    Invalid("checkpoints keep best above 1000", put("spec.checkpoints", {"keepBest": 1001}), "spec.checkpoints.keepBest",
            "must be <= 1000"),
    # each CEL rule's preconditions: what it indexes or reads is missing or empty
    Invalid("empty ladder levels (initialTrials rule preconditions)", ladder([]), "spec.fidelity.levels", "2 to 6 levels",
            api_words="should have at least 2 items"),
    Invalid("one ladder level (initialTrials rule preconditions)", ladder([LOW]), "spec.fidelity.levels", "2 to 6 levels",
            api_words="should have at least 2 items"),
    Invalid("ladder without levels (fidelity rules preconditions)", changes(put("spec.pruner", {"type": "none"}), put("spec.fidelity", {})),
            "spec.fidelity.levels", "2 to 6 levels", api_words="Required value"),
    Invalid("empty stage ladder levels (stage initialTrials rule preconditions)",
            staged({"name": "coarse", "kind": "search", "pruner": {"type": "none"}, "fidelity": {"levels": [], "initialTrials": 4}}),
            "spec.stages[1].fidelity.levels", "2 to 6 levels", api_words="should have at least 2 items"),
    Invalid("empty stages list (first stage rule preconditions)", put("spec.stages", []), "spec.stages", "non-empty list",
            api_words="should have at least 1 items"),
    Invalid("stage without a kind (stage rules preconditions)", staged({"name": "coarse", "maxTrials": 4}), "spec.stages[1].kind",
            "is required", api_words="Required value"),
    Invalid("stage region without high (region rule preconditions)", staged(dict(COARSE, searchSpace=[{"name": "num_layers", "int": {"low": 4}}])),
            "spec.stages[1].searchSpace[0].int.high", "must be a finite number", api_words="Required value"),
    Invalid("stage empty region (region rule preconditions)", staged(dict(COARSE, searchSpace=[])), "spec.stages[1].searchSpace",
            "at least one parameter", api_words="should have at least 1 items"),
    Invalid("stage hyperband with min resource only (stage pruner rules preconditions)",
            staged(dict(COARSE, pruner={"type": "hyperband", "minResource": 3})), "spec.stages[1].pruner.maxResource",
            "is required for hyperband"),
    Invalid("grid over an empty search space (grid rule preconditions)", changes(put("spec.sampler", {"type": "grid"}), space()),
            "spec.searchSpace", "at least one parameter", api_words="should have at least 1 items"),
    Invalid("int range without low (int rules preconditions)", space({"name": "n", "int": {"high": 4, "log": True}}),
            "spec.searchSpace[0].int.low", "must be a finite number", api_words="Required value"),
    Invalid("float range without high (float rules preconditions)", space({"name": "x", "float": {"low": 0.1, "step": 0.1}}),
            "spec.searchSpace[0].float.high", "must be a finite number", api_words="Required value"),
    Invalid("rank without a metric (rank rules preconditions)", ladder([dict(LOW, rank={"tieBreak": {"metric": "cer"}}), HIGH]),
            "spec.fidelity.levels[0].rank.metric", "is required", api_words="Required value"),
    Invalid("tie-break without a metric (rank rules preconditions)",
            ladder([dict(LOW, rank={"metric": "cer", "tieBreak": {"direction": "minimize"}}), HIGH]),
            "spec.fidelity.levels[0].rank.tieBreak.metric", "is required", api_words="Required value"),
    Invalid("brackets without levels (brackets rule preconditions)",
            changes(put("spec.pruner", {"type": "none"}), put("spec.fidelity", {"brackets": 2})),
            "spec.fidelity.levels", "2 to 6 levels", api_words="Required value"),
    Invalid("stage rank metric without an objective metric (rank metric rule preconditions)",
            changes(put("spec.objective", {"direction": "maximize"}),
                    staged({"name": "coarse", "kind": "search", "pruner": {"type": "none"}, "fidelity": {
                        "levels": [dict(LOW, rank={"metric": "accuracy"}), HIGH], "reductionFactor": 2, "initialTrials": 4}})),
            "spec.stages[1].fidelity.levels[0].rank.metric", "unknown rank metric 'accuracy'", api_field="spec.stages",
            api_words="must be wer, cer, val_loss or the objective's metric"),
]


def local_problems(case: Invalid, tmp_path: Path) -> list[tuple[str, str]]:
    """What `speechtune validate` reports for the case (it runs spec.load_study, which runs parse_study)."""
    with pytest.raises(spec.SpecError) as caught:
        if case.text is not None:
            (tmp_path / "study.yaml").write_text(case.text)
            spec.load_study(tmp_path / "study.yaml")
        else:
            spec.parse_study(case.manifest())
    return caught.value.problems


def test_invalid_case_ids_are_unique():
    assert len({case.id for case in INVALID}) == len(INVALID)


@pytest.mark.parametrize("case", INVALID, ids=lambda case: case.id)
def test_invalid_spec_names_the_field_and_the_problem(case, tmp_path):
    problems = local_problems(case, tmp_path)
    named = [path for path, _ in problems]
    assert set(case.fields) <= set(named), problems
    assert any(path == case.fields[0] and case.words in message for path, message in problems), problems
    if case.only:
        assert set(named) == set(case.fields), problems


def test_speechtune_validate_rejects_a_negative_gpu_limit_naming_the_field(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(next(case for case in INVALID if case.id == "negative gpu limit").manifest()))
    assert cli.main(["validate", str(path)]) == cli.EXIT_INVALID
    assert f"  spec.trialTemplate.resources.limits[{GPU}]: must be >= 0, got -1" in capsys.readouterr().out


def _with(change) -> dict:
    document = manifest()
    change(document)
    return document


@pytest.mark.parametrize("resources", [
    {"limits": {GPU: 2, "cpu": "500m", "memory": "16Gi"}, "requests": {GPU: "1", "cpu": "1.5", "memory": "1e9"}},
    {"limits": {GPU: 0, "amd.com/gpu": "2", "ephemeral-storage": "10G"}},
    {"requests": {GPU: "1e1", "cpu": ".5"}},
], ids=["integers-and-quantities", "zero-gpus", "exponents"])
def test_whole_gpu_counts_and_quantities_are_valid(resources):
    assert spec.parse_study(_with(template(resources=resources))).trial_template.resources == resources


def test_an_integral_number_is_an_integer_as_on_the_api_server():
    """The API server reads 10.0 in an integer field (or a resource amount) as 10; so does a study file."""
    study = spec.parse_study(_with(changes(put("spec.maxTrials", 10.0), template(resources={"limits": {GPU: 1.0}}))))
    assert study.max_trials == 10 and isinstance(study.max_trials, int)


def test_a_null_field_is_a_field_not_given_as_on_the_api_server():
    """The API server drops a null field of a study object before it validates it; a study file means the same."""
    study = spec.parse_study(_with(changes(
        put("spec.fidelity", None), put("spec.stages", None), put("spec.warmStart", None), put("spec.checkpoints", None),
        template(env={"A": "1", "B": None}, resources={"limits": {GPU: None, "cpu": "1"}}))))
    assert (study.fidelity, study.stages, study.warm_start) == (None, (), None)
    assert (study.trial_template.env, study.trial_template.resources) == ({"A": "1"}, {"limits": {"cpu": "1"}})
    study = spec.parse_study(_with(ladder([LOW, {"name": "high", "overrides": {"epochs": 9, "train_hours": None}}])))
    assert study.fidelity.levels[1].overrides == {"epochs": 9}
    study = spec.parse_study(_with(space({"name": "c", "categorical": [None, "a"]})))
    assert study.search_space[0].choices == (None, "a")  # a null choice is a choice


def test_exponent_without_a_dot_is_a_number_in_study_files(tmp_path):
    path = tmp_path / "study.yaml"
    document = manifest(searchSpace=[{"name": "lr", "float": {"low": "LOW", "high": 1e-2, "log": True}}])
    path.write_text(yaml.safe_dump(document).replace("LOW", "1e-5"))
    assert spec.load_study(path).search_space[0].low == 1e-5


def template_with(workers):
    return manifest(trialTemplate={"command": ["python", "-m", "speechtune.fake_trainer"], "workers": workers})


def test_workers_are_cold_unless_the_template_asks_for_warm_ones():
    assert spec.parse_study(manifest()).trial_template.workers == spec.Workers(mode="cold")
    workers = spec.parse_study(template_with({"mode": "warm", "maxRunsPerWorker": 5, "stopGraceSeconds": 2.5,
                                              "maxRssMiB": 4096, "maxGpuMiB": 1024})).trial_template.workers
    assert workers == spec.Workers(mode="warm", max_runs_per_worker=5, stop_grace_seconds=2.5, max_rss_mib=4096, max_gpu_mib=1024)
    assert spec.parse_study(template_with({"mode": "warm"})).trial_template.workers == spec.Workers(
        mode="warm", max_runs_per_worker=20, stop_grace_seconds=10.0, max_rss_mib=None, max_gpu_mib=None)


def test_a_level_ranks_by_the_objective_unless_it_declares_a_rank():
    study = spec.parse_study(manifest(pruner={"type": "none"}, fidelity={"levels": [
        dict(LOW, rank={"metric": "val_loss", "tieBreak": {"metric": "cer"}}),
        {"name": "mid", "overrides": {"epochs": 3}, "rank": {"metric": "wer"}}, HIGH], "reductionFactor": 2, "initialTrials": 4}))
    low, mid, high = study.fidelity.levels
    assert low.rank == spec.Rank(metric="val_loss", direction="minimize", tie_break="cer", tie_break_direction="minimize")
    assert mid.rank == spec.Rank(metric="wer", direction="minimize") and high.rank is None


def test_a_rank_by_the_objective_takes_its_direction_and_any_objective_metric_may_rank():
    study = spec.parse_study(manifest(objective={"metric": "accuracy", "direction": "maximize"}, pruner={"type": "none"}, fidelity={
        "levels": [dict(LOW, rank={"metric": "val_loss", "tieBreak": {"metric": "accuracy"}}), dict(HIGH, rank={"metric": "accuracy"})],
        "reductionFactor": 2, "initialTrials": 4}))
    low, high = study.fidelity.levels
    assert (low.rank.direction, low.rank.tie_break, low.rank.tie_break_direction) == ("minimize", "accuracy", "maximize")
    assert (high.rank.metric, high.rank.direction) == ("accuracy", "maximize")


def test_brackets_start_hyperband_sized_rungs_at_each_level():
    def sizes(levels, eta, initial, brackets):
        fidelity = spec.parse_study(manifest(pruner={"type": "none"}, fidelity={
            "levels": [{"name": f"l{i}", "overrides": {"epochs": i + 1}} for i in range(levels)],
            "reductionFactor": eta, "initialTrials": initial, "brackets": brackets})).fidelity
        return fidelity.bracket_sizes(), fidelity.configurations()

    assert sizes(3, 4, 64, 1) == ([[64, 16, 4]], 64)
    assert sizes(3, 4, 64, 3) == ([[64, 16, 4], [0, 24, 6], [0, 0, 12]], 100)  # Hyperband's n_s for s_max = 2, eta 4
    assert sizes(4, 3, 27, 4) == ([[27, 9, 3, 1], [0, 12, 4, 1], [0, 0, 6, 2], [0, 0, 0, 4]], 49)  # Li et al.'s table for R = 27
    staged_study = spec.parse_study(manifest(pruner={"type": "none"}, stages=[{"name": "ladder", "kind": "search", "fidelity": {
        "levels": [LOW, HIGH], "reductionFactor": 2, "initialTrials": 4, "brackets": 2}}]))
    assert staged_study.max_trials == 4 + 4  # a stage's budget counts every bracket's configurations
