"""The engine's own cost per trial, against plain Optuna doing the same sequence.

Setup (issue 3): TPE + Hyperband(1, 9, 3), 5 params, 9 reports per trial, a
trainer that costs nothing. Plain Optuna runs ask / report / should_prune /
tell in one loop; the engine runs its whole path: ask, launch (in-process),
line parsing, report / prune, tell. Both on the same storage kind, in one run.

    python bench/engine_overhead.py --trials 1000 --storage sqlite postgres
    python bench/engine_overhead.py --trials 10000 --engine-only --storage sqlite postgres
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechtune import fake_trainer, spec  # noqa: E402
from speechtune.executor import Executor  # noqa: E402
from speechtune.storage import WriteThroughStorage, open_rdb  # noqa: E402
from tests.support.postgres import postgres_server  # noqa: E402

STEPS = 9
SPACE = [
    {"name": "n_mels", "int": {"low": 40, "high": 128, "step": 8}},
    {"name": "win_length_ms", "int": {"low": 20, "high": 50, "step": 5}},
    {"name": "num_layers", "int": {"low": 4, "high": 12}},
    {"name": "d_model", "categorical": [256, 512, 1024]},
    {"name": "lr", "float": {"low": 1e-5, "high": 1e-3, "log": True}},
]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(label: str, total: float, asks: list[float], trials: int) -> dict:
    return {
        "runner": label,
        "trials": trials,
        "per_trial_ms": round(1000 * total / trials, 2),
        "ask_p50_ms": round(1000 * percentile(asks, 0.50), 2),
        "ask_p95_ms": round(1000 * percentile(asks, 0.95), 2),
        "ask_p95_last_1000_ms": round(1000 * percentile(asks[-1000:], 0.95), 2),
    }


def plain_optuna(url: str, trials: int) -> dict:
    study = optuna.create_study(
        storage=url, study_name="plain", sampler=optuna.samplers.TPESampler(seed=1),
        pruner=optuna.pruners.HyperbandPruner(1, STEPS, 3),
    )
    distributions = _distributions()
    asks: list[float] = []
    began = time.perf_counter()
    for _ in range(trials):
        t0 = time.perf_counter()
        trial = study.ask(distributions)
        asks.append(time.perf_counter() - t0)
        params = {name: str(value) for name, value in trial.params.items()}
        state = optuna.trial.TrialState.COMPLETE
        for step in range(1, STEPS + 1):
            trial.report(fake_trainer.wer(params, step), step)
            if trial.should_prune():
                state = optuna.trial.TrialState.PRUNED
                break
        if state == optuna.trial.TrialState.PRUNED:
            study.tell(trial, state=state)
        else:
            study.tell(trial, fake_trainer.wer(params, STEPS))
    return summary("plain Optuna", time.perf_counter() - began, asks, trials)


def _distributions():
    from speechtune.search import distributions

    return distributions(_study_spec("sqlite:///unused.db", 1).search_space)


def _study_spec(url: str, trials: int) -> spec.Study:
    return spec.parse_study({
        "metadata": {"name": "engine"},
        "spec": {
            "maxTrials": trials, "parallelism": 1, "sampler": {"type": "tpe", "seed": 1},
            "pruner": {"type": "hyperband", "minResource": 1, "maxResource": STEPS, "reductionFactor": 3},
            "searchSpace": SPACE, "trialTemplate": {"command": ["none"]}, "storage": {"url": url},
        },
    })


def engine(url: str, trials: int) -> dict:
    study = _study_spec(url, trials)
    runner = Executor(study, WriteThroughStorage(open_rdb(url)), fake_trainer.InProcessBackend(epochs=STEPS))
    asks: list[float] = []
    ask = runner.study.ask

    def timed_ask(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return ask(*args, **kwargs)
        finally:
            asks.append(time.perf_counter() - t0)

    runner.study.ask = timed_ask
    began = time.perf_counter()
    outcome = asyncio.run(runner.run())
    assert outcome.state == "Succeeded", outcome.message
    assert len(runner.trials()) == trials
    return summary("speechtune engine", time.perf_counter() - began, asks, trials)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--storage", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres", "memory"])
    parser.add_argument("--engine-only", action="store_true", help="skip plain Optuna (it takes hours at 10,000)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, Python {platform.python_version()}, Optuna {optuna.__version__}")
    for kind in args.storage:
        with ExitStack() as stack:
            if kind == "postgres":
                base = stack.enter_context(postgres_server()).url
                urls = [base, base]
            elif kind == "sqlite":
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                urls = [f"sqlite:///{folder}/plain.db", f"sqlite:///{folder}/engine.db"]
            else:
                stack.enter_context(nullcontext())
                urls = [None, None]
            results = []
            if not args.engine_only and kind != "memory":
                results.append(plain_optuna(urls[0], args.trials))
            if kind != "memory":
                results.append(engine(urls[1], args.trials))
            for result in results:
                print(json.dumps({"storage": kind, **result}))
            if len(results) == 2:
                ratio = results[0]["per_trial_ms"] / results[1]["per_trial_ms"]
                ask_ratio = results[0]["ask_p95_ms"] / results[1]["ask_p95_ms"]
                print(json.dumps({"storage": kind, "plain_over_engine_per_trial": round(ratio, 2), "plain_over_engine_ask_p95": round(ask_ratio, 2)}))


if __name__ == "__main__":
    main()
