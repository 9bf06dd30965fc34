from pathlib import Path

import pytest
import yaml

from speechtune import spec

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

INVALID = {
    "low above high": (
        manifest(searchSpace=[{"name": "lr", "float": {"low": 1.0, "high": 0.1}}]),
        "spec.searchSpace[0].float.low", "must be <= high",
    ),
    "log with low zero": (
        manifest(searchSpace=[{"name": "lr", "float": {"low": 0, "high": 0.1, "log": True}}]),
        "spec.searchSpace[0].float.low", "must be > 0 when log is true",
    ),
    "empty categorical": (
        manifest(searchSpace=[{"name": "encoder", "categorical": []}]),
        "spec.searchSpace[0].categorical", "non-empty list",
    ),
    "duplicate names": (
        manifest(searchSpace=[PARAM, PARAM]),
        "spec.searchSpace[1].name", "duplicate parameter name 'p'",
    ),
    "unknown sampler": (manifest(sampler={"type": "bayes"}), "spec.sampler.type", "unknown value 'bayes'"),
    "unknown pruner": (manifest(pruner={"type": "asha"}), "spec.pruner.type", "unknown value 'asha'"),
    "parallelism zero": (manifest(parallelism=0), "spec.parallelism", "must be >= 1"),
    "min resource above max": (
        manifest(pruner={"type": "hyperband", "minResource": 10, "maxResource": 3}),
        "spec.pruner.minResource", "must be <= maxResource",
    ),
    "hyperband without max resource": (
        manifest(pruner={"type": "hyperband"}), "spec.pruner.maxResource", "is required for hyperband",
    ),
    "max trials not a number": (manifest(maxTrials="many"), "spec.maxTrials", "must be an integer"),
    "unknown direction": (manifest(objective={"metric": "wer", "direction": "down"}), "spec.objective.direction", "unknown value 'down'"),
    "two kinds in one param": (
        manifest(searchSpace=[{"name": "p", "int": {"low": 1, "high": 2}, "float": {"low": 1, "high": 2}}]),
        "spec.searchSpace[0]", "exactly one of int, float or categorical",
    ),
    "fractional int bound": (
        manifest(searchSpace=[{"name": "p", "int": {"low": 1.5, "high": 4}}]),
        "spec.searchSpace[0].int.low", "whole number",
    ),
    "negative step": (
        manifest(searchSpace=[{"name": "p", "int": {"low": 1, "high": 4, "step": -1}}]),
        "spec.searchSpace[0].int.step", "must be > 0",
    ),
    "step with log": (
        manifest(searchSpace=[{"name": "p", "float": {"low": 0.1, "high": 1, "step": 0.1, "log": True}}]),
        "spec.searchSpace[0].float.step", "cannot be combined with log",
    ),
    "bad param name": (
        manifest(searchSpace=[{"name": "learning rate", "float": {"low": 0.1, "high": 1}}]),
        "spec.searchSpace[0].name", "must be an identifier",
    ),
    "missing command": (manifest(trialTemplate={"args": ["--x"]}), "spec.trialTemplate.command", "is required"),
    "missing search space": (manifest(searchSpace=None), "spec.searchSpace", "is required"),
    "unknown spec field": (manifest(maxTrail=3), "spec.maxTrail", "unknown field"),
    "storage url without scheme": (manifest(storage={"url": "speechtune.db"}), "spec.storage.url", "must be a database URL"),
    "grid over a continuous float": (
        manifest(sampler={"type": "grid"}, searchSpace=[PARAM]), "spec.searchSpace[0].float", "grid sampler needs a step",
    ),
    "categorical choice is a mapping": (
        manifest(searchSpace=[{"name": "p", "categorical": [{"a": 1}]}]),
        "spec.searchSpace[0].categorical[0]", "must be strings, numbers",
    ),
    "reduction factor one": (
        manifest(pruner={"type": "successiveHalving", "reductionFactor": 1}), "spec.pruner.reductionFactor", "must be >= 2",
    ),
    "shorthand with empty list": (
        manifest(searchSpace=None, search_space={"dropout": []}), "spec.search_space.dropout.categorical", "non-empty list",
    ),
    "secretRef without key": (manifest(storage={"secretRef": {"name": "db"}}), "spec.storage.secretRef.key", "is required"),
}


@pytest.mark.parametrize("case", sorted(INVALID), ids=str)
def test_invalid_spec_names_the_field_and_the_problem(case):
    document, path, message = INVALID[case]
    problems = problems_of(document)
    assert any(p == path and message in m for p, m in problems), problems


def test_every_problem_is_reported_at_once():
    problems = problems_of(manifest(parallelism=0, maxTrials=0, sampler={"type": "bayes"}))
    assert {p for p, _ in problems} == {"spec.parallelism", "spec.maxTrials", "spec.sampler.type"}


def test_wrong_kind_and_bad_name_are_rejected():
    document = manifest()
    document["kind"] = "Study"
    document["metadata"]["name"] = "Has_Capitals"
    assert {p for p, _ in problems_of(document)} == {"kind", "metadata.name"}


def test_load_study_reports_yaml_syntax_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("spec: [unclosed\n")
    with pytest.raises(spec.SpecError, match="not valid YAML"):
        spec.load_study(path)


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


@pytest.mark.parametrize("workers, path, message", [
    ({"mode": "hot"}, "mode", "unknown value 'hot'; expected one of: cold, warm"),
    ({"mode": "warm", "maxRunsPerWorker": 0}, "maxRunsPerWorker", "must be >= 1"),
    ({"mode": "warm", "maxRunsPerWorker": "many"}, "maxRunsPerWorker", "must be an integer"),
    ({"mode": "warm", "stopGraceSeconds": 0}, "stopGraceSeconds", "must be > 0"),
    ({"mode": "warm", "stopGraceSeconds": "10s"}, "stopGraceSeconds", "must be a finite number"),
    ({"mode": "warm", "maxRssMiB": 0.5}, "maxRssMiB", "must be an integer"),
    ({"mode": "warm", "maxGpuMiB": -1}, "maxGpuMiB", "must be >= 1"),
    ({"mode": "warm", "reuse": True}, "reuse", "unknown field"),
])
def test_bad_workers_values_name_their_field(workers, path, message):
    problems = problems_of(template_with(workers))
    assert any(p == f"spec.trialTemplate.workers.{path}" and message in m for p, m in problems), problems


def test_workers_must_be_a_mapping():
    assert ("spec.trialTemplate.workers", "must be a mapping") in problems_of(template_with("warm"))
