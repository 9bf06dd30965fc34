"""The engine's Prometheus metrics: GPU-seconds counted while trials run, and series that exist before their first event."""

import asyncio
import time
from dataclasses import replace

import pytest
from prometheus_client import REGISTRY

from speechtune import metrics, spec
from speechtune.executor import Executor
from speechtune.local import LocalProcessBackend
from speechtune.storage import WriteThroughStorage, open_rdb
from tests.speechtune.k8s.helpers import REPO
from tests.speechtune.test_executor import make_study


@pytest.mark.parametrize("resources, gpus", [
    ({}, 0), ({"limits": {"cpu": "2"}}, 0), ({"limits": {"nvidia.com/gpu": 1}}, 1),
    ({"limits": {"nvidia.com/gpu": "2"}}, 2), ({"requests": {"nvidia.com/gpu": "4"}, "limits": {"nvidia.com/gpu": 4}}, 4),
    ({"limits": {"nvidia.com/gpu": "lots"}}, 0),
])
def test_requested_gpus_reads_nvidia_gpu_from_requests_or_limits(resources, gpus):
    assert metrics.requested_gpus(resources) == gpus


def gpu_seconds(study: str) -> float:
    return REGISTRY.get_sample_value("speechtune_gpu_seconds_total", {"namespace": "local", "study": study}) or 0.0


def test_gpu_seconds_grow_while_a_trial_runs_and_total_gpus_times_run_time(tmp_path):
    study = make_study(tmp_path, args=("--epochs", "4", "--sleep", "0.5"), max_trials=2, parallelism=2)
    study = replace(study, name="gpu-metered", trial_template=replace(
        study.trial_template, resources={"limits": {"nvidia.com/gpu": "2"}}))
    before = gpu_seconds("gpu-metered")

    async def run() -> tuple[float, float]:
        engine = Executor(study, WriteThroughStorage(open_rdb(study.storage.url)), LocalProcessBackend(tmp_path / "logs"))
        began = time.monotonic()
        task = asyncio.create_task(engine.run())
        while gpu_seconds("gpu-metered") == before:  # the first epoch's value, long before the trials end
            await asyncio.sleep(0.05)
        assert engine.counts()["COMPLETE"] == 0
        outcome = await task
        assert outcome.state == "Succeeded", outcome.message
        return gpu_seconds("gpu-metered") - before, time.monotonic() - began

    counted, wall = asyncio.run(run())
    # Following begins before a trial's first value, so it covers at least the 3 sleeps of 0.5 s between
    # its first and last values: 2 trials × 2 GPUs × 1.5 s, whatever the interpreter's start-up took.
    assert 2 * 2 * 3 * 0.5 <= counted <= 2 * 2 * wall


def test_counters_the_dashboard_rates_exist_at_zero_as_soon_as_a_study_starts(tmp_path):
    """Prometheus' rate() ignores the value a series first appears with: a first batch of promotions
    that created its series would never show as a rate."""
    study = spec.load_study(REPO / "examples" / "fake-ladder.yaml")
    study = replace(study, name="zero-start", storage=replace(study.storage, url=f"sqlite:///{tmp_path}/z.db"))
    Executor(study, WriteThroughStorage(open_rdb(study.storage.url)), LocalProcessBackend(tmp_path / "logs"))
    labels = {"namespace": "local", "study": "zero-start"}
    assert REGISTRY.get_sample_value("speechtune_pruned_total", labels) == 0
    for rung in ("medium", "high"):
        assert REGISTRY.get_sample_value("speechtune_promotions_total", {**labels, "rung": rung}) == 0
    for step in ("low", "medium", "high"):
        assert REGISTRY.get_sample_value("speechtune_reported_value_count", {**labels, "step": step}) == 0
