"""The study spec: one schema for the local YAML file and the CRD's ``spec``.

``parse_study`` turns a manifest (a dict) into a frozen ``Study``, or raises
``SpecError`` listing every problem at once, each with its field path, so the
user fixes a file in one pass instead of one error at a time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

API_VERSION = "speechtune.io/v1alpha1"
KIND = "SpeechTuningStudy"
SAMPLERS = ("tpe", "random", "grid", "cmaes", "qmc", "gp")
PRUNERS = ("none", "median", "successiveHalving", "hyperband")
DIRECTIONS = ("minimize", "maximize")
PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
STUDY_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # a DNS label, as the CRD's metadata.name rule
DATABASE_URL = re.compile(r"^[A-Za-z0-9+._-]+://")  # as the CRD's storage.url pattern
# A Kubernetes quantity (k8s.io/apimachinery resource.Quantity): 2, 500m, 1.5Gi, 1e3.
QUANTITY = re.compile(r"^(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?P<suffix>[eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
QUANTITY_SUFFIXES = {"": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
                     "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
# The bounds the CRD's schema sets (crds/speechtuningstudies.yaml), so a study file and a study object agree.
MAX_NAME = 63  # parameter names, the metric
MAX_PARAMS = 64
MAX_CHOICES = 256
MAX_PARENTS = 8  # entries of a parameter's when
MAX_LEVELS = 6
MAX_LEVEL_NAME = 20  # part of the level's Job names
MAX_MAP_ENTRIES = 64  # overrides, a stage's fixed and params
MAX_STAGES = 16
MAX_SEEDS = 32
MAX_TOP_K = 1000
MAX_RESOURCES = 32  # entries of resources.limits and resources.requests
MAX_QUANTITY = 64  # characters of a resource amount


class SpecError(ValueError):
    """Every problem found in a spec; ``problems`` holds (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("\n".join(f"{path}: {message}" for path, message in problems))


# A parameter's condition (``when``): (parent, the parent's choices in which it applies) pairs, all of which must hold.
When = tuple[tuple[str, tuple[Any, ...]], ...]


@dataclass(frozen=True)
class IntParam:
    name: str
    low: int
    high: int
    step: int = 1
    log: bool = False
    when: When = ()


@dataclass(frozen=True)
class FloatParam:
    name: str
    low: float
    high: float
    step: float | None = None
    log: bool = False
    when: When = ()


@dataclass(frozen=True)
class CategoricalParam:
    name: str
    choices: tuple[Any, ...]
    when: When = ()


Param = IntParam | FloatParam | CategoricalParam


def same_choice(a: Any, b: Any) -> bool:
    """Whether two categorical choices are the same (True is not 1, as in JSON)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def applies(param: Param, values: dict[str, Any]) -> bool:
    """Whether a (possibly conditional) parameter applies given the values its parents took; a parent absent
    from ``values`` (itself inactive) makes it inactive, so a condition on a conditional parent chains."""
    return all(parent in values and any(same_choice(values[parent], choice) for choice in choices)
               for parent, choices in param.when)


def is_conditional(space: tuple[Param, ...]) -> bool:
    return any(param.when for param in space)


@dataclass(frozen=True)
class Objective:
    metric: str = "wer"
    direction: str = "minimize"


@dataclass(frozen=True)
class Sampler:
    type: str = "tpe"
    seed: int | None = None
    startup_trials: int = 10


@dataclass(frozen=True)
class Pruner:
    type: str = "none"
    min_resource: int = 1
    max_resource: int | None = None
    reduction_factor: int = 3
    startup_trials: int = 5
    warmup_steps: int = 0


WORKER_MODES = ("cold", "warm")


@dataclass(frozen=True)
class Workers:
    """How runs get processes: one each (cold), or warm workers that run many (docs/engine.md, "Warm workers")."""

    mode: str = "cold"
    max_runs_per_worker: int = 20
    stop_grace_seconds: float = 10.0  # a stopped run that has not ended by then costs its worker
    max_rss_mib: int | None = None  # replace a worker whose resident memory passed this after a run
    max_gpu_mib: int | None = None  # replace a worker that still holds this much GPU memory after a run


@dataclass(frozen=True)
class TrialTemplate:
    command: tuple[str, ...]
    args: tuple[str, ...] = ()
    image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    workers: Workers = Workers()
    replicas: int = 1  # pods per trial (data-parallel across pods; a cluster only): resources are per pod


# The metrics a level may rank configurations by besides the study's objective: what the speechtune
# trainers report every epoch (the NeMo trainer: wer, cer, val_loss). A typo here would rank by nothing.
RANK_METRICS = ("wer", "cer", "val_loss")
MAX_REPLICAS = 128  # pods per trial (trialTemplate.replicas), as the CRD's maximum


@dataclass(frozen=True)
class Rank:
    """How a fidelity level orders configurations for promotion: a metric, then a tie-break metric (docs/fidelity.md)."""

    metric: str
    direction: str = "minimize"
    tie_break: str | None = None
    tie_break_direction: str = "minimize"


@dataclass(frozen=True)
class Level:
    name: str
    overrides: dict[str, Any]
    rank: Rank | None = None  # None: by the study's objective


@dataclass(frozen=True)
class Fidelity:
    """The multi-fidelity ladder: each level is a new run with overrides (seed section 3)."""

    levels: tuple[Level, ...]
    reduction_factor: int = 4
    initial_trials: int = 64
    mode: str = "synchronous"
    resume_from_checkpoint: bool = True
    correlation_warning: float = 0.5
    cost_warning: float = 0.5  # a level costing more than this share of a full run screens too dearly to pay off
    checkpoint_volume: str | None = None
    brackets: int = 1  # Hyperband: bracket b starts its configurations at level b

    def rung_sizes(self) -> list[int]:
        """How many configurations run each level: 64 -> 16 -> 4 for eta 4."""
        return [max(1, self.initial_trials // self.reduction_factor**k) for k in range(len(self.levels))]

    def bracket_sizes(self) -> list[list[int]]:
        """Each bracket's configurations per level (0 below its start), as in Hyperband: bracket b starts
        ceil(L / (L - b) * initialTrials / eta^b) configurations at level b, so that every bracket costs about
        the same when a level costs eta times the one below (64 -> 16 -> 4, 24 -> 6, 12 for 3 levels, eta 4)."""
        count, eta = len(self.levels), self.reduction_factor
        sizes = []
        for bracket in range(self.brackets):
            first = self.initial_trials if bracket == 0 else math.ceil(count * self.initial_trials / ((count - bracket) * eta**bracket))
            sizes.append([0 if level < bracket else max(1, first // eta ** (level - bracket)) for level in range(count)])
        return sizes

    def configurations(self) -> int:
        """The configurations the ladder samples: each bracket's first level."""
        return sum(sizes[bracket] for bracket, sizes in enumerate(self.bracket_sizes())) if self.levels else 0


@dataclass(frozen=True)
class Storage:
    url: str | None = None
    secret_name: str | None = None
    secret_key: str | None = None


STAGE_KINDS = ("baseline", "search", "refine", "validate")


@dataclass(frozen=True)
class Stage:
    """One step of the production workflow (seed section 13): all stages share one Optuna study."""

    name: str
    kind: str  # baseline | search | refine | validate
    max_trials: int = 0  # search and refine
    sampler: Sampler | None = None  # None: spec.sampler for search, TPE for refine
    pruner: Pruner | None = None  # None: spec.pruner
    fidelity: Fidelity | None = None
    search_space: tuple[Param, ...] = ()  # a region inside spec.searchSpace; empty: the whole space
    fixed: dict[str, Any] = field(default_factory=dict)  # parameters held at these values
    params: dict[str, Any] = field(default_factory=dict)  # baseline: the configuration (empty: the template's defaults)
    seeds: int = 1  # baseline: runs with seeds 0..N-1; validate: reruns of the best with seeds 1..N
    top_k: int = 5  # refine: the region is around the best top_k configurations so far
    margin: float = 0.1  # refine: widen each range by this share of its full width on each side
    template: TrialTemplate | None = None  # its own trainer (command, args, env, image): search_space is then its own
    handoff: Handoff | None = None

    def space(self, study_space: tuple[Param, ...]) -> tuple[Param, ...]:
        """The parameters this stage samples: its own space when it runs its own trainer, else the study's."""
        return self.search_space if self.template is not None else study_space


@dataclass(frozen=True)
class Handoff:
    """What a stage takes from an earlier stage's best trial: its kept checkpoint, passed as the flag
    ``checkpoint_flag`` (e.g. a vocoder's ``--acoustic_checkpoint``), and/or the parameters its final
    protocol line reported (``params``: e.g. the architecture a weight-sharing search derived)."""

    stages: tuple[str, ...]  # the best trial of these stages together (e.g. a baseline and the search after it)
    checkpoint_flag: str | None = None
    params: bool = False


@dataclass(frozen=True)
class WarmStart:
    """Start from another study (seed section 12): its best configurations, region, values or weights."""

    study: str
    storage: Storage = field(default_factory=Storage)  # empty: the study's own storage
    top_k: int = 0  # enqueue the source's best top_k configurations first
    narrow_top_k: int = 0  # search only around the source's best narrow_top_k (0: no narrowing)
    margin: float = 0.1
    fixed: tuple[str, ...] = ()  # parameters held at the source's best values
    init_from: str | None = None  # "best": every run loads the source's best checkpoint


@dataclass(frozen=True)
class Checkpoints:
    """Keep the best trials' final checkpoints, so the study can be a warm-start source."""

    keep_best: int = 0
    volume: str | None = None  # locally a directory, on a cluster a PVC name


@dataclass(frozen=True)
class Study:
    name: str
    objective: Objective
    max_trials: int
    parallelism: int
    max_failed_trials: int
    sampler: Sampler
    pruner: Pruner
    search_space: tuple[Param, ...]
    trial_template: TrialTemplate
    storage: Storage
    namespace: str | None = None
    fidelity: Fidelity | None = None
    validation_seeds: int = 0
    stages: tuple[Stage, ...] = ()
    warm_start: WarmStart | None = None
    checkpoints: Checkpoints = field(default_factory=Checkpoints)

    def template_of(self, stage: Stage | None) -> TrialTemplate:
        """What a stage's runs start: the study's trialTemplate, with the stage's own command, args, env and image."""
        own = stage.template if stage is not None else None
        if own is None:
            return self.trial_template
        return replace(self.trial_template, command=own.command, args=own.args, env={**self.trial_template.env, **own.env},
                       image=own.image or self.trial_template.image)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` as a string; people mean a number, as in YAML 1.2 and JSON."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_study(path: str | Path) -> Study:
    """Read and validate a study file (YAML)."""
    text = Path(path).read_text()
    try:
        manifest = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise SpecError([("<file>", f"not valid YAML: {exc}")]) from None
    return parse_study(manifest)


def parse_study(manifest: Any) -> Study:
    """Validate a whole manifest (apiVersion, kind, metadata, spec)."""
    check = _Checker()
    if not isinstance(manifest, dict):
        raise SpecError([("<root>", "must be a mapping with apiVersion, kind, metadata and spec")])
    if manifest.get("apiVersion", API_VERSION) != API_VERSION:
        check.fail("apiVersion", f"must be {API_VERSION!r}, got {manifest.get('apiVersion')!r}")
    if manifest.get("kind", KIND) != KIND:
        check.fail("kind", f"must be {KIND!r}, got {manifest.get('kind')!r}")
    metadata = manifest.get("metadata") or {}
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not STUDY_NAME.match(name) or len(name) > 63:
        check.fail("metadata.name", "is required: lowercase letters, digits and '-', at most 63 characters")
    spec = _without_nulls(manifest.get("spec"))
    if not isinstance(spec, dict):
        check.fail("spec", "is required and must be a mapping")
        raise SpecError(check.problems)
    namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
    study = _parse_spec(spec, str(name), namespace, check)
    if check.problems:
        raise SpecError(check.problems)
    return study


def _without_nulls(value: Any) -> Any:
    """The spec with every null-valued field left out: null is "not given", as the API server reads a study object
    (it drops a null field before validating it), so that `fidelity: null` or `epochs: null` mean the same in both.
    A null list item (a categorical choice) stays."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


class _Checker:
    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    def mapping(self, value: Any, path: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, "must be a mapping")
            return {}
        return value

    def integer(self, value: Any, path: str, default: int | None = None, minimum: int | None = None,
                maximum: int | None = None) -> int | None:
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 10.0 is the integer 10, as the API server reads JSON
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"must be an integer, got {value!r}")
            return default
        if minimum is not None and value < minimum:
            self.fail(path, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.fail(path, f"must be <= {maximum}, got {value}")
        return value

    def number(self, value: Any, path: str) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(path, f"must be a finite number, got {value!r}")
            return None
        return float(value)

    def choice(self, value: Any, path: str, allowed: tuple[str, ...], default: str) -> str:
        if value is None:
            return default
        if value not in allowed:
            self.fail(path, f"unknown value {value!r}; expected one of: {', '.join(allowed)}")
            return default
        return value

    def unknown_keys(self, value: dict, path: str, known: set[str]) -> None:
        for key in value:
            if key not in known:
                self.fail(f"{path}.{key}" if path else key, f"unknown field; known fields: {', '.join(sorted(known))}")


_SPEC_FIELDS = {
    "objective", "maxTrials", "parallelism", "maxFailedTrials", "sampler", "pruner",
    "searchSpace", "search_space", "trialTemplate", "storage", "fidelity", "validation",
    "stages", "warmStart", "checkpoints",
}
FIDELITY_MODES = ("synchronous", "asynchronous")


def _parse_spec(spec: dict, name: str, namespace: str | None, check: _Checker) -> Study:
    check.unknown_keys(spec, "spec", _SPEC_FIELDS)
    objective = _parse_objective(check.mapping(spec.get("objective"), "spec.objective"), check)
    max_trials = check.integer(spec.get("maxTrials"), "spec.maxTrials", default=20, minimum=1)
    parallelism = check.integer(spec.get("parallelism"), "spec.parallelism", default=1, minimum=1)
    max_failed = check.integer(spec.get("maxFailedTrials"), "spec.maxFailedTrials", default=5, minimum=0)
    sampler = _parse_sampler(check.mapping(spec.get("sampler"), "spec.sampler"), check)
    pruner = _parse_pruner(check.mapping(spec.get("pruner"), "spec.pruner"), check)
    if "searchSpace" in spec and "search_space" in spec:
        check.fail("spec.search_space", "give either searchSpace or search_space, not both")
    space_path = "spec.search_space" if "search_space" in spec else "spec.searchSpace"
    space = _parse_search_space(spec.get("searchSpace", spec.get("search_space")), space_path, check)
    template = _parse_template(check.mapping(spec.get("trialTemplate"), "spec.trialTemplate"), check)
    storage = _parse_storage(check.mapping(spec.get("storage"), "spec.storage"), check)
    fidelity = _parse_fidelity(spec.get("fidelity"), objective, check) if "fidelity" in spec else None
    if fidelity is not None and pruner.type != "none":
        check.fail("spec.pruner.type", "must be none with spec.fidelity: the ladder decides which configurations continue")
    stages = _parse_stages(spec["stages"], space, pruner, objective, check) if "stages" in spec else ()
    if stages and fidelity is not None:
        check.fail("spec.fidelity", "give the ladder on the stage that uses it (spec.stages[i].fidelity), not with spec.stages")
    warm_start = _parse_warm_start(spec["warmStart"], space, check) if "warmStart" in spec else None
    checkpoints = _parse_checkpoints(check.mapping(spec.get("checkpoints"), "spec.checkpoints"), check)
    for index, stage in enumerate(stages):
        if stage.template is not None and template.workers.mode == "warm":
            check.fail(f"spec.stages[{index}].trialTemplate",
                       "not with spec.trialTemplate.workers.mode warm: a warm worker runs the study's command")
        if stage.handoff is not None and stage.handoff.checkpoint_flag and not checkpoints.keep_best:
            check.fail(f"spec.stages[{index}].handoff.checkpointFlag",
                       f"needs spec.checkpoints.keepBest >= 1: the best checkpoint of {', '.join(stage.handoff.stages)} must be kept")
    validation = check.mapping(spec.get("validation"), "spec.validation")
    check.unknown_keys(validation, "spec.validation", {"seeds"})
    seeds = check.integer(validation.get("seeds"), "spec.validation.seeds", default=0, minimum=0, maximum=MAX_SEEDS) or 0
    if seeds and stages:
        check.fail("spec.validation.seeds", "with spec.stages, retrain the best with a stage of kind validate")
    elif seeds and fidelity is None:
        check.fail("spec.validation.seeds", "needs spec.fidelity (or a validate stage in spec.stages)")
    if sampler.type == "grid":
        if is_conditional(space):
            check.fail("spec.sampler.type", GRID_CONDITIONAL)
        for index, param in enumerate(space):
            if isinstance(param, FloatParam) and param.step is None:
                check.fail(f"{space_path}[{index}].float", "the grid sampler needs a step (or a categorical) for every float parameter")
    if stages:  # each stage has its own budget; spec.maxTrials is their sum
        max_trials = sum(stage_trials(stage) for stage in stages)
    return Study(
        name=name, objective=objective, max_trials=max_trials or 1, parallelism=parallelism or 1,
        max_failed_trials=max_failed if max_failed is not None else 5, sampler=sampler, pruner=pruner,
        search_space=space, trial_template=template, storage=storage, namespace=namespace,
        fidelity=fidelity, validation_seeds=seeds, stages=stages, warm_start=warm_start, checkpoints=checkpoints,
    )


def stage_trials(stage: Stage) -> int:
    """The trials a stage adds to the study (a validate stage reruns an existing one)."""
    if stage.kind == "baseline":
        return stage.seeds
    if stage.kind == "validate":
        return 0
    configurations = stage.fidelity.configurations() if stage.fidelity else 0
    return configurations or stage.max_trials  # a rejected ladder has no levels


GRID_CONDITIONAL = ("the grid sampler needs a fixed search space, and this one has conditional parameters (when): "
                    "use tpe or random, or list the combinations as categoricals")

_STAGE_FIELDS = {
    "baseline": {"name", "kind", "params", "seeds", "trialTemplate", "searchSpace", "handoff"},
    "search": {"name", "kind", "maxTrials", "sampler", "pruner", "fidelity", "searchSpace", "fixed", "trialTemplate", "handoff"},
    "refine": {"name", "kind", "maxTrials", "sampler", "pruner", "fidelity", "fixed", "topK", "margin"},
    "validate": {"name", "kind", "seeds"},
}


def _parse_stages(value: Any, study_space: tuple[Param, ...], default_pruner: Pruner, objective: Objective,
                  check: _Checker) -> tuple[Stage, ...]:
    if not isinstance(value, list) or not value:
        check.fail("spec.stages", "must be a non-empty list of stages, e.g. [{name: coarse, kind: search, maxTrials: 20}]")
        return ()
    if len(value) > MAX_STAGES:
        check.fail("spec.stages", f"must have at most {MAX_STAGES} stages, got {len(value)}")
    stages: list[Stage] = []
    names: set[str] = set()
    for index, raw in enumerate(value):
        path = f"spec.stages[{index}]"
        raw = check.mapping(raw, path)
        name = raw.get("name")
        if not isinstance(name, str) or not STUDY_NAME.match(name) or len(name) > 40:
            check.fail(f"{path}.name", f"is required: lowercase letters, digits and '-', at most 40 characters, got {name!r}")
            name = f"stage{index}"
        elif name in names:
            check.fail(f"{path}.name", f"duplicate stage name {name!r}")
        names.add(name)
        kind = raw.get("kind")
        if kind not in STAGE_KINDS:
            check.fail(f"{path}.kind", f"is required, one of: {', '.join(STAGE_KINDS)}; got {kind!r}")
            continue
        check.unknown_keys(raw, path, _STAGE_FIELDS[kind])
        template = _parse_stage_template(raw["trialTemplate"], f"{path}.trialTemplate", check) if "trialTemplate" in raw else None
        if template is not None and "searchSpace" not in raw and kind == "search":
            check.fail(f"{path}.searchSpace", "is required with a stage's own trialTemplate: the parameters of its trainer")
        elif template is None and "searchSpace" in raw and kind == "baseline":
            check.fail(f"{path}.searchSpace", "a baseline stage takes params, or its own trialTemplate with its own searchSpace")
        space = study_space
        region: tuple[Param, ...] = ()
        if template is not None:  # its own trainer: its searchSpace is its own, conditions and all
            region = space = _parse_search_space(raw["searchSpace"], f"{path}.searchSpace", check) if "searchSpace" in raw else ()
        elif "searchSpace" in raw:
            region = _parse_search_space(raw["searchSpace"], f"{path}.searchSpace", check, region=True)
            _check_region(region, space, f"{path}.searchSpace", check)
        handoff = _parse_handoff(raw["handoff"], f"{path}.handoff", stages, space, check) if "handoff" in raw else None
        searching = kind in ("search", "refine")
        if kind in ("validate", "refine") and not any(s.kind in ("baseline", "search", "refine") for s in stages):
            what = "the best configuration so far" if kind == "validate" else "the top-k of the earlier stages"
            check.fail(f"{path}.kind", f"a {kind} stage needs an earlier baseline, search or refine stage: it uses {what}")
        fidelity = _parse_fidelity(raw["fidelity"], objective, check, f"{path}.fidelity") if "fidelity" in raw else None
        max_trials = 0
        if searching and fidelity is None:
            max_trials = check.integer(raw.get("maxTrials"), f"{path}.maxTrials", minimum=1) or 0
            if "maxTrials" not in raw:
                check.fail(f"{path}.maxTrials", f"is required for a {kind} stage: its trial budget")
        elif searching and "maxTrials" in raw:
            check.fail(f"{path}.maxTrials", "not with fidelity: the ladder's initialTrials is the stage's budget")
        sampler = _parse_sampler(check.mapping(raw["sampler"], f"{path}.sampler"), check, f"{path}.sampler") if "sampler" in raw else None
        pruner = _parse_pruner(check.mapping(raw["pruner"], f"{path}.pruner"), check, f"{path}.pruner") if "pruner" in raw else None
        if sampler is not None and sampler.type == "grid" and is_conditional(space):
            check.fail(f"{path}.sampler.type", GRID_CONDITIONAL)
        if fidelity is not None and (pruner or default_pruner).type != "none":
            check.fail(f"{path}.pruner.type", "must be none with a ladder: the ladder decides which configurations continue")
        fixed = check.mapping(raw.get("fixed"), f"{path}.fixed")
        params = check.mapping(raw.get("params"), f"{path}.params")
        for entries, where in ((fixed, f"{path}.fixed"), (params, f"{path}.params")):
            if len(entries) > MAX_MAP_ENTRIES:
                check.fail(where, f"must have at most {MAX_MAP_ENTRIES} entries, got {len(entries)}")
        for key, item in {**fixed, **params}.items():
            where = f"{path}.fixed.{key}" if key in fixed else f"{path}.params.{key}"
            if not isinstance(key, str) or not PARAM_NAME.match(key):
                check.fail(where, "must be a parameter name (letters, digits, '_')")
            elif not isinstance(item, (str, int, float, bool)):
                check.fail(where, f"must be a string, number or boolean, got {item!r}")
        for param in space:  # a baseline's conditional parameter would be dropped where its condition does not hold
            if param.name in params and not applies(param, params):
                condition = " and ".join(f"{parent} in {list(choices)!r}" for parent, choices in param.when)
                check.fail(f"{path}.params.{param.name}", f"applies only when {condition}: give its parents in params too")
        seeds = check.integer(raw.get("seeds"), f"{path}.seeds", default=3 if kind == "validate" else 1, minimum=1,
                              maximum=MAX_SEEDS) or 1
        top_k = check.integer(raw.get("topK"), f"{path}.topK", default=5, minimum=1, maximum=MAX_TOP_K) or 5
        margin = _fraction(raw.get("margin"), f"{path}.margin", check)
        if fidelity is not None and template is not None:
            check.fail(f"{path}.fidelity", "not with a stage's own trialTemplate: a ladder's levels are flags of the study's trainer")
        stages.append(Stage(name=name, kind=kind, max_trials=max_trials, sampler=sampler, pruner=pruner, fidelity=fidelity,
                            search_space=region, fixed=dict(fixed), params=dict(params), seeds=seeds, top_k=top_k, margin=margin,
                            template=template, handoff=handoff))
    return tuple(stages)


def _parse_stage_template(value: Any, path: str, check: _Checker) -> TrialTemplate:
    """A stage's own trainer: command (required), args, env and image; resources and workers stay the study's."""
    value = check.mapping(value, path)
    check.unknown_keys(value, path, {"command", "args", "env", "image"})
    command, args, image = _command_args_image(value, path, check)
    return TrialTemplate(command=command, args=args, image=image, env=_parse_env(value.get("env", {}) or {}, f"{path}.env", check))


def _parse_handoff(value: Any, path: str, earlier: list[Stage], space: tuple[Param, ...], check: _Checker) -> Handoff | None:
    value = check.mapping(value, path)
    check.unknown_keys(value, path, {"from", "checkpointFlag", "params"})
    given = value.get("from")
    names = given if isinstance(given, list) and given else [None]
    sources = [stage.name for stage in earlier if stage.kind != "validate"]
    unknown = [name for name in names if name not in sources]
    if unknown:
        check.fail(f"{path}.from", f"must be a list of earlier baseline, search or refine stages ({', '.join(sources) or 'none yet'}), "
                                   f"got {given!r}")
    flag = value.get("checkpointFlag")
    if flag is not None and (not isinstance(flag, str) or not PARAM_NAME.match(flag)):
        check.fail(f"{path}.checkpointFlag", f"must be a flag name (letters, digits, '_'; the run gets --<name>=<file>), got {flag!r}")
        flag = None
    elif flag is not None and any(param.name == flag for param in space):
        check.fail(f"{path}.checkpointFlag", f"{flag!r} is also a parameter this stage samples")
    params = value.get("params", False)
    if not isinstance(params, bool):
        check.fail(f"{path}.params", f"must be true or false, got {params!r}")
        params = False
    if flag is None and not params and "checkpointFlag" not in value:
        check.fail(path, "does nothing: give checkpointFlag (pass the best checkpoint) and/or params: true (its reported parameters)")
    return Handoff(stages=tuple(names), checkpoint_flag=flag, params=params) if not unknown else None


def _fraction(value: Any, path: str, check: _Checker, default: float = 0.1) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        check.fail(path, f"must be a number in [0, 1] (a share of each range's width), got {value!r}")
        return default
    return float(value)


def _check_region(region: tuple[Param, ...], space: tuple[Param, ...], path: str, check: _Checker) -> None:
    """A stage's searchSpace narrows spec.searchSpace: same names and kinds, ranges and choices inside."""
    full = {param.name: param for param in space}
    for index, param in enumerate(region):
        where = f"{path}[{index}]"
        outer = full.get(param.name)
        if outer is None:
            check.fail(f"{where}.name", f"{param.name!r} is not in spec.searchSpace; a stage narrows that space, it cannot add to it")
        elif type(outer) is not type(param):
            check.fail(where, f"{param.name!r} must keep its kind from spec.searchSpace")
        elif isinstance(param, CategoricalParam):
            extra = [choice for choice in param.choices if choice not in outer.choices]
            if extra:
                check.fail(f"{where}.categorical", f"choices {extra!r} are not in spec.searchSpace's {list(outer.choices)!r}")
        elif param.low < outer.low or param.high > outer.high:
            check.fail(where, f"range [{param.low:g}, {param.high:g}] must lie inside spec.searchSpace's [{outer.low:g}, {outer.high:g}]")


def _parse_warm_start(value: Any, space: tuple[Param, ...], check: _Checker) -> WarmStart | None:
    path = "spec.warmStart"
    value = check.mapping(value, path)
    check.unknown_keys(value, path, {"study", "storage", "topK", "narrow", "fixed", "initFrom"})
    study = value.get("study")
    if not isinstance(study, str) or not study:
        check.fail(f"{path}.study", "is required: the name of the source study")
        study = ""
    elif len(study) > 512:
        check.fail(f"{path}.study", f"must be at most 512 characters, got {len(study)}")
    storage = _parse_storage(check.mapping(value.get("storage"), f"{path}.storage"), check, f"{path}.storage")
    top_k = check.integer(value.get("topK"), f"{path}.topK", default=0, minimum=0, maximum=MAX_TOP_K) or 0
    narrow_top_k, margin = 0, 0.1
    if "narrow" in value:
        narrow = check.mapping(value["narrow"], f"{path}.narrow")
        check.unknown_keys(narrow, f"{path}.narrow", {"topK", "margin"})
        narrow_top_k = check.integer(narrow.get("topK"), f"{path}.narrow.topK", default=5, minimum=1, maximum=MAX_TOP_K) or 5
        margin = _fraction(narrow.get("margin"), f"{path}.narrow.margin", check)
    fixed = value.get("fixed", [])
    if not isinstance(fixed, list):
        check.fail(f"{path}.fixed", "must be a list of parameter names, e.g. [encoder, num_layers, d_model]")
        fixed = []
    if len(fixed) > MAX_PARAMS:
        check.fail(f"{path}.fixed", f"must have at most {MAX_PARAMS} names, got {len(fixed)}")
    for index, name in enumerate(fixed):
        if not isinstance(name, str) or not PARAM_NAME.match(name) or len(name) > MAX_NAME:
            check.fail(f"{path}.fixed[{index}]", f"must be a parameter name (letters, digits, '_', at most {MAX_NAME}), got {name!r}")
        elif name in fixed[:index]:
            check.fail(f"{path}.fixed[{index}]", f"duplicate name {name!r}")
    fixed = list(dict.fromkeys(name for name in fixed if isinstance(name, str) and PARAM_NAME.match(name)))
    init_from = value.get("initFrom")
    if init_from is not None and init_from != "best":
        check.fail(f"{path}.initFrom", f"unknown value {init_from!r}; expected: best (the source's best checkpoint)")
        init_from = None
    if not (top_k or narrow_top_k or fixed or init_from):
        check.fail(path, "does nothing: give topK, narrow, fixed or initFrom")
    return WarmStart(study=study, storage=storage, top_k=top_k, narrow_top_k=narrow_top_k, margin=margin,
                     fixed=tuple(fixed), init_from=init_from)


def _parse_checkpoints(value: dict, check: _Checker) -> Checkpoints:
    path = "spec.checkpoints"
    check.unknown_keys(value, path, {"keepBest", "volume"})
    volume = value.get("volume")
    if volume is not None and not isinstance(volume, str):
        check.fail(f"{path}.volume", "must be a directory (locally) or a PVC name (on a cluster)")
        volume = None
    keep_best = check.integer(value.get("keepBest"), f"{path}.keepBest", default=0, minimum=0, maximum=MAX_TOP_K) or 0
    return Checkpoints(keep_best=keep_best, volume=volume)


def _parse_fidelity(value: Any, objective: Objective, check: _Checker, path: str = "spec.fidelity") -> Fidelity | None:
    value = check.mapping(value, path)
    check.unknown_keys(value, path, {"levels", "reductionFactor", "initialTrials", "mode", "resumeFromCheckpoint",
                                     "correlationWarning", "costWarning", "checkpointVolume", "brackets"})
    raw_levels = value.get("levels")
    if not isinstance(raw_levels, list) or not 2 <= len(raw_levels) <= MAX_LEVELS:
        check.fail(f"{path}.levels", f"needs 2 to {MAX_LEVELS} levels, lowest fidelity first")
        raw_levels = raw_levels if isinstance(raw_levels, list) else []
    levels: list[Level] = []
    for index, level in enumerate(raw_levels):
        where = f"{path}.levels[{index}]"
        level = check.mapping(level, where)
        check.unknown_keys(level, where, {"name", "overrides", "rank"})
        name = level.get("name")
        if not isinstance(name, str) or not STUDY_NAME.match(name) or len(name) > MAX_LEVEL_NAME:
            check.fail(f"{where}.name", f"is required: lowercase letters, digits and '-', at most {MAX_LEVEL_NAME} characters "
                       f"(it is part of the level's Job names), got {name!r}")
            name = f"level{index}"
        elif name in {earlier.name for earlier in levels}:
            check.fail(f"{where}.name", f"duplicate level name {name!r}: level names must be unique")
        overrides = check.mapping(level.get("overrides"), f"{where}.overrides")
        if len(overrides) > MAX_MAP_ENTRIES:
            check.fail(f"{where}.overrides", f"must have at most {MAX_MAP_ENTRIES} entries, got {len(overrides)}")
        for key, override in overrides.items():
            if not isinstance(key, str) or not PARAM_NAME.match(key):
                check.fail(f"{where}.overrides.{key}", "must be a parameter name (letters, digits, '_')")
            if not isinstance(override, (str, int, float, bool)):
                check.fail(f"{where}.overrides.{key}", f"must be a string, number or boolean, got {override!r}")
        rank = _parse_rank(level["rank"], objective, check, f"{where}.rank") if "rank" in level else None
        levels.append(Level(name=name, overrides=dict(overrides), rank=rank))
    correlation = value.get("correlationWarning", 0.5)
    if isinstance(correlation, bool) or not isinstance(correlation, (int, float)) or not -1 <= correlation <= 1:
        check.fail(f"{path}.correlationWarning", f"must be a number in [-1, 1], got {correlation!r}")
        correlation = 0.5
    cost = value.get("costWarning", 0.5)
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not 0 < cost <= 1:
        check.fail(f"{path}.costWarning", f"must be a number in (0, 1], a share of a top-level run's cost, got {cost!r}")
        cost = 0.5
    resume = value.get("resumeFromCheckpoint", True)
    if not isinstance(resume, bool):
        check.fail(f"{path}.resumeFromCheckpoint", f"must be true or false, got {resume!r}")
    volume = value.get("checkpointVolume")
    if volume is not None and not isinstance(volume, str):
        check.fail(f"{path}.checkpointVolume", "must be a directory (locally) or a PVC name (on a cluster)")
    fidelity = Fidelity(
        levels=tuple(levels),
        reduction_factor=check.integer(value.get("reductionFactor"), f"{path}.reductionFactor", default=4, minimum=2, maximum=64) or 4,
        initial_trials=check.integer(value.get("initialTrials"), f"{path}.initialTrials", default=64, minimum=1,
                                     maximum=100000) or 64,
        mode=check.choice(value.get("mode"), f"{path}.mode", FIDELITY_MODES, "synchronous"),
        resume_from_checkpoint=resume is True,
        correlation_warning=float(correlation),
        cost_warning=float(cost),
        checkpoint_volume=volume,
        brackets=check.integer(value.get("brackets"), f"{path}.brackets", default=1, minimum=1, maximum=MAX_LEVELS) or 1,
    )
    if levels and fidelity.initial_trials < fidelity.reduction_factor ** (len(levels) - 1):
        check.fail(f"{path}.initialTrials", f"must be >= reductionFactor^(levels-1) = "
                   f"{fidelity.reduction_factor ** (len(levels) - 1)}, so the top level gets a configuration")
    if len(raw_levels) >= 2 and fidelity.brackets > len(raw_levels):
        check.fail(f"{path}.brackets", f"must be <= the number of levels ({len(raw_levels)}): bracket b starts at level b, "
                   f"got {fidelity.brackets}")
    if fidelity.brackets > len(levels):
        fidelity = replace(fidelity, brackets=max(1, len(levels)))  # a rejected spec still yields a ladder its checks can size
    return fidelity


def _parse_rank(value: Any, objective: Objective, check: _Checker, path: str) -> Rank | None:
    """A level's rank: {metric, direction, tieBreak: {metric, direction}}; the metrics are RANK_METRICS or the objective's."""
    value = check.mapping(value, path)
    check.unknown_keys(value, path, {"metric", "direction", "tieBreak"})
    metric = _rank_metric(value.get("metric"), objective, check, f"{path}.metric")
    direction = check.choice(value.get("direction"), f"{path}.direction", DIRECTIONS,
                             objective.direction if metric == objective.metric else "minimize")
    tie_break, tie_direction = None, "minimize"
    if "tieBreak" in value:
        tie = check.mapping(value["tieBreak"], f"{path}.tieBreak")
        check.unknown_keys(tie, f"{path}.tieBreak", {"metric", "direction"})
        tie_break = _rank_metric(tie.get("metric"), objective, check, f"{path}.tieBreak.metric")
        tie_direction = check.choice(tie.get("direction"), f"{path}.tieBreak.direction", DIRECTIONS,
                                     objective.direction if tie_break == objective.metric else "minimize")
        if tie_break is not None and tie_break == metric:
            check.fail(f"{path}.tieBreak.metric", f"must differ from rank.metric ({metric!r}): the tie-break orders the "
                       "configurations whose rank.metric is equal")
    if metric is None:
        return None
    return Rank(metric=metric, direction=direction, tie_break=tie_break, tie_break_direction=tie_direction)


def _rank_metric(metric: Any, objective: Objective, check: _Checker, path: str) -> str | None:
    known = dict.fromkeys((*RANK_METRICS, objective.metric))
    if not isinstance(metric, str) or not metric:
        check.fail(path, f"is required: a metric name, one of {', '.join(known)}, got {metric!r}")
        return None
    if metric not in known:
        check.fail(path, f"unknown rank metric {metric!r}; expected one of: {', '.join(RANK_METRICS)} "
                   f"(what the trainers report every epoch) or the objective's metric ({objective.metric!r})")
        return None
    return metric


def _parse_objective(value: dict, check: _Checker) -> Objective:
    check.unknown_keys(value, "spec.objective", {"metric", "direction"})
    metric = value.get("metric", "wer")
    if not isinstance(metric, str) or not PARAM_NAME.match(metric) or len(metric) > MAX_NAME:
        check.fail("spec.objective.metric", f"must be a metric name such as 'wer' (at most {MAX_NAME} characters), got {metric!r}")
        metric = "wer"
    direction = check.choice(value.get("direction"), "spec.objective.direction", DIRECTIONS, "minimize")
    return Objective(metric=metric, direction=direction)


def _parse_sampler(value: dict, check: _Checker, path: str = "spec.sampler") -> Sampler:
    check.unknown_keys(value, path, {"type", "seed", "startupTrials"})
    return Sampler(
        type=check.choice(value.get("type"), f"{path}.type", SAMPLERS, "tpe"),
        seed=check.integer(value.get("seed"), f"{path}.seed", minimum=0),
        startup_trials=check.integer(value.get("startupTrials"), f"{path}.startupTrials", default=10, minimum=0),
    )


def _parse_pruner(value: dict, check: _Checker, path: str = "spec.pruner") -> Pruner:
    check.unknown_keys(value, path, {"type", "minResource", "maxResource", "reductionFactor", "startupTrials", "warmupSteps"})
    pruner = Pruner(
        type=check.choice(value.get("type"), f"{path}.type", PRUNERS, "none"),
        min_resource=check.integer(value.get("minResource"), f"{path}.minResource", default=1, minimum=1),
        max_resource=check.integer(value.get("maxResource"), f"{path}.maxResource", minimum=1),
        reduction_factor=check.integer(value.get("reductionFactor"), f"{path}.reductionFactor", default=3, minimum=2),
        startup_trials=check.integer(value.get("startupTrials"), f"{path}.startupTrials", default=5, minimum=0),
        warmup_steps=check.integer(value.get("warmupSteps"), f"{path}.warmupSteps", default=0, minimum=0),
    )
    if pruner.type == "hyperband" and pruner.max_resource is None:
        check.fail(f"{path}.maxResource", "is required for hyperband: the last step a trial reports (e.g. its epochs)")
    if pruner.max_resource is not None and pruner.min_resource > pruner.max_resource:
        check.fail(f"{path}.minResource", f"must be <= maxResource ({pruner.max_resource}), got {pruner.min_resource}")
    return pruner


def _parse_search_space(value: Any, path: str, check: _Checker, region: bool = False) -> tuple[Param, ...]:
    """The parameters, in order; ``region``: a stage's searchSpace, which narrows ranges and has no conditions."""
    if value is None:
        check.fail(path, "is required: the parameters to tune")
        return ()
    if isinstance(value, dict):  # the ESPnet-style shorthand: name -> list of choices
        entries = [(f"{path}.{name}", {"name": name, "categorical": choices}) for name, choices in value.items()]
    elif isinstance(value, list):
        entries = [(f"{path}[{index}]", entry) for index, entry in enumerate(value)]
    else:
        check.fail(path, "must be a list of parameters, or a map of name -> list of choices")
        return ()
    if not entries:
        check.fail(path, "must declare at least one parameter")
    if len(entries) > MAX_PARAMS:
        check.fail(path, f"must declare at most {MAX_PARAMS} parameters, got {len(entries)}")
    params: list[Param] = []
    seen: dict[str, str] = {}
    for entry_path, entry in entries:
        param = _parse_param(entry, entry_path, check, region)
        if param is None:
            continue
        if param.name in seen:
            check.fail(f"{entry_path}.name", f"duplicate parameter name {param.name!r} (first declared at {seen[param.name]})")
            continue
        seen[param.name] = entry_path
        params.append(param)
    _check_conditions(params, entries, check)
    return tuple(params)


def _check_conditions(params: list[Param], entries: list[tuple[str, Any]], check: _Checker) -> None:
    """Each parent a parameter's when names is a categorical listed before it (so no parameter depends on itself,
    directly or through a cycle), and each listed choice is one of the parent's. The API server checks the same,
    except the choices, which its rules cannot see (they are untyped)."""
    order: dict[str, tuple[int, str]] = {}  # name -> (index, path) of its first declaration
    for index, (path, entry) in enumerate(entries):
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            order.setdefault(entry["name"], (index, path))
    by_name = {param.name: param for param in params}
    for param in params:
        index, path = order[param.name]
        for parent, choices in param.when:
            where = f"{path}.when.{parent}"
            found = by_name.get(parent)
            if parent == param.name:
                check.fail(where, f"{param.name!r} cannot be conditional on itself")
            elif parent not in order:
                check.fail(where, f"unknown parameter {parent!r}: a parent must be a categorical parameter of the search space")
            elif order[parent][0] > index:
                check.fail(where, f"the parent {parent!r} must be listed before {param.name!r}: a parent comes before its "
                           "children in the search space (which also rules out cycles)")
            elif found is None:
                continue  # the parent is invalid itself, and reported at its own path
            elif not isinstance(found, CategoricalParam):
                kind = "an int" if isinstance(found, IntParam) else "a float"
                check.fail(where, f"the parent {parent!r} must be a categorical parameter, it is {kind} one")
            else:
                for number, choice in enumerate(choices):
                    if not any(same_choice(choice, option) for option in found.choices):
                        check.fail(f"{where}[{number}]", f"{choice!r} is not a choice of {parent!r} "
                                   f"({', '.join(map(repr, found.choices))})")


def _parse_when(value: Any, path: str, check: _Checker) -> When:
    """{parent: [choices]}: the parameter applies only where every parent took one of its listed choices."""
    if not isinstance(value, dict) or not value:
        check.fail(path, "must map parent parameters to lists of their choices, e.g. {encoder: [conformer, transformer]}")
        return ()
    if len(value) > MAX_PARENTS:
        check.fail(path, f"must name at most {MAX_PARENTS} parents, got {len(value)}")
    when: list[tuple[str, tuple[Any, ...]]] = []
    for parent, choices in value.items():
        where = f"{path}.{parent}"
        if not isinstance(choices, list) or not choices:
            check.fail(where, f"must be a non-empty list of {parent!r}'s choices in which this parameter applies")
            continue
        if len(choices) > MAX_CHOICES:
            check.fail(where, f"must list at most {MAX_CHOICES} choices, got {len(choices)}")
        for index, choice in enumerate(choices):
            if isinstance(choice, bool) or not isinstance(choice, (str, int)):
                check.fail(f"{where}[{index}]", f"must be a string or an integer (a choice of {parent!r}), got {choice!r}")
        when.append((str(parent), tuple(choices)))
    return tuple(when)


def _parse_param(entry: Any, path: str, check: _Checker, region: bool = False) -> Param | None:
    if not isinstance(entry, dict):
        check.fail(path, "must be a mapping like {name: lr, float: {low: 1e-5, high: 1e-3, log: true}}")
        return None
    check.unknown_keys(entry, path, {"name", "int", "float", "categorical"} | (set() if region else {"when"}))
    when = _parse_when(entry["when"], f"{path}.when", check) if "when" in entry and not region else ()
    name = entry.get("name")
    if not isinstance(name, str) or not PARAM_NAME.match(name) or len(name) > MAX_NAME:
        check.fail(f"{path}.name", f"must be an identifier (letters, digits, '_', at most {MAX_NAME} characters), got {name!r}")
        return None
    kinds = [kind for kind in ("int", "float", "categorical") if kind in entry]
    if len(kinds) != 1:
        check.fail(path, f"parameter {name!r} needs exactly one of int, float or categorical")
        return None
    kind = kinds[0]
    body = entry[kind]
    if kind == "categorical":
        if not isinstance(body, list) or not body:
            check.fail(f"{path}.categorical", f"parameter {name!r} needs a non-empty list of choices")
            return None
        if len(body) > MAX_CHOICES:
            check.fail(f"{path}.categorical", f"parameter {name!r} has {len(body)} choices; at most {MAX_CHOICES}")
        for index, choice in enumerate(body):
            if choice is not None and not isinstance(choice, (str, int, float, bool)):
                check.fail(f"{path}.categorical[{index}]", f"choices must be strings, numbers, booleans or null, got {choice!r}")
        if len(set(map(repr, body))) != len(body):
            check.fail(f"{path}.categorical", f"parameter {name!r} has duplicate choices")
        return CategoricalParam(name=name, choices=tuple(body), when=when)
    body = check.mapping(body, f"{path}.{kind}")
    check.unknown_keys(body, f"{path}.{kind}", {"low", "high", "step", "log"})
    low = check.number(body.get("low"), f"{path}.{kind}.low")
    high = check.number(body.get("high"), f"{path}.{kind}.high")
    log = body.get("log", False)
    if not isinstance(log, bool):
        check.fail(f"{path}.{kind}.log", f"must be true or false, got {log!r}")
        log = False
    step = body.get("step")
    if step is not None:
        step = check.number(step, f"{path}.{kind}.step")
        if step is not None and step <= 0:
            check.fail(f"{path}.{kind}.step", f"must be > 0, got {step}")
        if step is not None and log:
            check.fail(f"{path}.{kind}.step", "cannot be combined with log: true")
    if low is None or high is None:
        return None
    if low > high:
        check.fail(f"{path}.{kind}.low", f"must be <= high ({high:g}), got {low:g}")
    if log and low <= 0:
        check.fail(f"{path}.{kind}.low", f"must be > 0 when log is true, got {low:g}")
    if kind == "int":
        for bound, number in (("low", low), ("high", high), ("step", step)):
            if number is not None and not float(number).is_integer():
                check.fail(f"{path}.int.{bound}", f"must be a whole number for an int parameter, got {number:g}")
        return IntParam(name=name, low=int(low), high=int(high), step=int(step or 1), log=log, when=when)
    return FloatParam(name=name, low=low, high=high, step=step, log=log, when=when)


def _parse_template(value: dict, check: _Checker) -> TrialTemplate:
    path = "spec.trialTemplate"
    check.unknown_keys(value, path, {"image", "command", "args", "env", "resources", "workers", "replicas"})
    command, args, image = _command_args_image(value, path, check)
    env = _parse_env(value.get("env", {}) or {}, f"{path}.env", check)
    return TrialTemplate(
        command=command, args=args, image=image,
        env=env, resources=_parse_resources(check.mapping(value.get("resources"), f"{path}.resources"), f"{path}.resources", check),
        workers=_parse_workers(check.mapping(value.get("workers"), f"{path}.workers"), check),
        replicas=_parse_replicas(value, path, check),
    )


def _command_args_image(value: dict, path: str, check: _Checker) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
    command = value.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(part, str) for part in command):
        check.fail(f"{path}.command", "is required: a non-empty list of strings, e.g. [speechtune-trainer, asr]")
        command = []
    args = value.get("args", [])
    if not isinstance(args, list) or not all(isinstance(arg, (str, int, float)) for arg in args):
        check.fail(f"{path}.args", "must be a list of strings")
        args = []
    image = value.get("image")
    if image is not None and not isinstance(image, str):
        check.fail(f"{path}.image", "must be a string")
    return tuple(command), tuple(str(arg) for arg in args), image


def _parse_replicas(value: dict, path: str, check: _Checker) -> int:
    """trialTemplate.replicas: pods per trial (docs/operator.md, "Trials across pods"); one warm worker is one pod."""
    replicas = check.integer(value.get("replicas"), f"{path}.replicas", default=1, minimum=1, maximum=MAX_REPLICAS)
    workers = value.get("workers") if isinstance(value.get("workers"), dict) else {}
    if isinstance(replicas, int) and replicas > 1 and workers.get("mode") == "warm":
        check.fail(f"{path}.replicas", "must be 1 with workers.mode warm: a warm worker is one pod")
    return replicas if isinstance(replicas, int) and 1 <= replicas <= MAX_REPLICAS else 1


def _parse_env(env: Any, path: str, check: _Checker) -> dict[str, str]:
    """A map of names to values, or the Kubernetes form [{name, value}] (the only one a study object has)."""
    if isinstance(env, list):
        pairs: dict[str, str] = {}
        for index, item in enumerate(env):
            where = f"{path}[{index}]"
            item = check.mapping(item, where)
            check.unknown_keys(item, where, {"name", "value"})
            name, text = item.get("name"), item.get("value")
            if not isinstance(name, str) or not name:
                check.fail(f"{where}.name", f"is required: the variable's name, got {name!r}")
            elif name in pairs:
                check.fail(f"{where}.name", f"duplicate variable {name!r}")
            if not isinstance(text, str):
                check.fail(f"{where}.value", f"is required: a string, got {text!r}")
            if isinstance(name, str) and name and isinstance(text, str):
                pairs.setdefault(name, text)
        return pairs
    if not isinstance(env, dict) or not all(isinstance(k, str) and k and isinstance(v, str) for k, v in env.items()):
        check.fail(path, "must map names to string values")
        return {}
    return env


def _quantity(value: Any) -> Decimal | None:
    """A resource amount as Kubernetes reads it (an integer, or a string such as 500m or 16Gi); None if it is none."""
    if isinstance(value, float) and value.is_integer():
        return Decimal(int(value))  # 1.0 is the integer 1, as the API server reads JSON
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    match = QUANTITY.match(value) if isinstance(value, str) else None
    if match is None:
        return None
    suffix = match["suffix"] or ""
    try:
        if suffix[:1] in ("e", "E") and len(suffix) > 1:
            return Decimal(match["number"]).scaleb(int(suffix[1:]))
        return Decimal(match["number"]) * QUANTITY_SUFFIXES[suffix]
    except (InvalidOperation, ValueError):
        return None


def is_gpu_resource(name: str) -> bool:
    """nvidia.com/gpu, amd.com/gpu: resources counted in whole devices."""
    return name.endswith("/gpu")


def _parse_resources(value: dict, path: str, check: _Checker) -> dict[str, Any]:
    """Container resources as in a Pod: limits and requests, each a map of resource name -> quantity.

    Every amount is >= 0, and a GPU count (a resource named */gpu, e.g. nvidia.com/gpu) is a whole number:
    the same rules as the CRD's schema, so `speechtune validate` and the API server agree.
    """
    check.unknown_keys(value, path, {"limits", "requests"})
    for kind in ("limits", "requests"):
        amounts = check.mapping(value.get(kind), f"{path}.{kind}")
        if len(amounts) > MAX_RESOURCES:
            check.fail(f"{path}.{kind}", f"must have at most {MAX_RESOURCES} resources, got {len(amounts)}")
        for name, amount in amounts.items():
            where = f"{path}.{kind}[{name}]"
            quantity = _quantity(amount)
            if isinstance(amount, str) and len(amount) > MAX_QUANTITY:
                check.fail(where, f"must be at most {MAX_QUANTITY} characters, got {len(amount)}")
            elif quantity is None:
                check.fail(where, f"must be an integer or a quantity string such as 2, 500m or 16Gi, got {amount!r}")
            elif quantity < 0:
                check.fail(where, f"must be >= 0, got {amount!r}")
            elif is_gpu_resource(str(name)) and quantity != quantity.to_integral_value():
                check.fail(where, f"must be a whole number of GPUs, got {amount!r}")
    return value


def _parse_workers(value: dict, check: _Checker) -> Workers:
    path = "spec.trialTemplate.workers"
    check.unknown_keys(value, path, {"mode", "maxRunsPerWorker", "stopGraceSeconds", "maxRssMiB", "maxGpuMiB"})
    grace = value.get("stopGraceSeconds", Workers.stop_grace_seconds)
    if check.number(grace, f"{path}.stopGraceSeconds") is None:
        grace = Workers.stop_grace_seconds
    elif grace <= 0:
        check.fail(f"{path}.stopGraceSeconds", f"must be > 0, got {grace}")
    return Workers(
        mode=check.choice(value.get("mode"), f"{path}.mode", WORKER_MODES, "cold"),
        max_runs_per_worker=check.integer(value.get("maxRunsPerWorker"), f"{path}.maxRunsPerWorker",
                                          default=Workers.max_runs_per_worker, minimum=1),
        stop_grace_seconds=float(grace),
        max_rss_mib=check.integer(value.get("maxRssMiB"), f"{path}.maxRssMiB", minimum=1),
        max_gpu_mib=check.integer(value.get("maxGpuMiB"), f"{path}.maxGpuMiB", minimum=1),
    )


def _parse_storage(value: dict, check: _Checker, path: str = "spec.storage") -> Storage:
    check.unknown_keys(value, path, {"url", "secretRef"})
    url = value.get("url")
    if url is not None and (not isinstance(url, str) or not DATABASE_URL.match(url)):
        check.fail(f"{path}.url", f"must be a database URL such as sqlite:///speechtune.db, got {url!r}")
        url = None
    ref = check.mapping(value.get("secretRef"), f"{path}.secretRef")
    if "secretRef" in value and isinstance(value["secretRef"], dict):
        check.unknown_keys(ref, f"{path}.secretRef", {"name", "key"})
        for key in ("name", "key"):
            if not isinstance(ref.get(key), str) or not ref.get(key):
                check.fail(f"{path}.secretRef.{key}", "is required when secretRef is given")
    if url and isinstance(value.get("secretRef"), dict):
        check.fail(path, "give either url or secretRef, not both")
    return Storage(url=url, secret_name=ref.get("name"), secret_key=ref.get("key"))
