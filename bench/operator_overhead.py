"""The operator on the real control plane, against the local runner (issue 5, "Performance").

Overhead: TRIALS fake-trainer trials of TRIAL_SECONDS each (5 epochs of 1 s),
PARALLELISM at a time, pruner off so every trial lasts as long as the ideal
assumes. The figure is wall time / (TRIALS x TRIAL_SECONDS / PARALLELISM),
and the slot gap: a trial's end to the next trial's Job creation. The peer is
the same study under `speechtune run` (the same engine, trials as local
processes), on the same PostgreSQL, in the same run.

Footprint: RUNNING trials at once, each a tiny sh loop that prints a protocol
line every REPORT_EVERY seconds; once all run, the operator's RSS and CPU over
WINDOW seconds, and speechtune_metric_lag_seconds over that window from its
/metrics. The peer is `speechtune run` with the same trials.

Trial start and end times come from the trials themselves: each runs under an
sh wrapper that appends "<trial> start|end <epoch seconds>" to a ledger file.
That works because the test cluster's node agent runs pods as processes on
this machine (tests/cluster/node_agent.py); Job creation times come from a
watch. Needs the cluster of tests/cluster/up running ($KUBECONFIG, else its
default state dir) and Debian's PostgreSQL (started here, on loopback).

    python bench/operator_overhead.py                          # both parts, the issue's numbers
    python bench/operator_overhead.py --part overhead --repeats 3
    python bench/operator_overhead.py --part overhead --runners operator-warm operator --repeats 3   # worker pods vs Jobs
    python bench/operator_overhead.py --part footprint --running 500 --window 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

import optuna
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from speechtune.k8s.api import Api, path  # noqa: E402
from speechtune.k8s.manifests import STUDY_LABEL, TRIAL_LABEL  # noqa: E402
from speechtune.k8s.runner import optuna_study_name  # noqa: E402
from tests.cluster.plugin import KubeCluster  # noqa: E402
from tests.support.postgres import postgres_server  # noqa: E402
from tests.support.prometheus import histogram_quantile, lag_buckets  # noqa: E402

DEFAULT_KUBECONFIG = Path.home() / ".cache" / "speechtune" / "cluster" / "state" / "admin.kubeconfig"
SPACE = [
    {"name": "n_mels", "int": {"low": 40, "high": 128, "step": 8}},
    {"name": "win_length_ms", "int": {"low": 20, "high": 50, "step": 5}},
    {"name": "num_layers", "int": {"low": 4, "high": 12}},
    {"name": "d_model", "categorical": [256, 512, 1024]},
    {"name": "lr", "float": {"low": 1.0e-5, "high": 1.0e-3, "log": True}},
]
LAG_GOAL_SECONDS = 2.0


# -- the trials ----------------------------------------------------------------------
def ledger_wrapper(ledger: Path, body: str) -> list[str]:
    """sh -c: note the start, run ``body``, note the end; the trial's args follow as "$@"."""
    note = f'echo "$SPEECHTUNE_TRIAL %s $(date +%%s.%%N)" >> {shlex.quote(str(ledger))}'
    return ["sh", "-c", f"{note % 'start'}; {body}; rc=$?; {note % 'end'}; exit $rc", "trial"]


def fake_trainer_template(ledger: Path, trial_seconds: float) -> dict:
    """The fake trainer, 5 epochs of trial_seconds / 5 each."""
    return {"command": ledger_wrapper(ledger, '"$@"'),
            "args": ["python", "-m", "speechtune.fake_trainer", "--epochs", "5", "--sleep", f"{trial_seconds / 5:g}"]}


def warm_fake_trainer_template(ledger: Path, trial_seconds: float) -> dict:
    """The fake trainer as a warm worker: many runs per pod process, so it notes each run's start and
    end itself (--timeline, the ledger's format) instead of an sh wrapper around its process."""
    return {"command": ["python", "-m", "speechtune.fake_trainer"],
            "args": ["--epochs", "5", "--sleep", f"{trial_seconds / 5:g}", f"--timeline={ledger}"],
            "workers": {"mode": "warm", "maxRunsPerWorker": 1000}}


def sleeper_template(ledger: Path, every: float, reports: int) -> dict:
    """A shell trainer: one protocol line (with its print time) every ``every`` s, ``reports`` times."""
    line = r'echo "{\"speechtune\": 1, \"step\": $i, \"wer\": 0.5, \"time\": $(date +%s.%N)}"'
    loop = (f"i=0; while [ $i -lt {reports} ]; do sleep {every:g}; i=$((i+1)); {line}; done; "
            r'echo "{\"speechtune\": 1, \"final\": true, \"wer\": 0.5}"')
    return {"command": ledger_wrapper(ledger, loop), "args": []}


def study_body(name: str, template: dict, trials: int, parallelism: int, *, cluster: bool, storage_url: str | None) -> dict:
    spec = {
        "objective": {"metric": "wer", "direction": "minimize"},
        "maxTrials": trials, "parallelism": parallelism, "maxFailedTrials": 5,
        "sampler": {"type": "tpe", "seed": 42, "startupTrials": 8},
        "pruner": {"type": "none"},
        "searchSpace": SPACE,
        "trialTemplate": dict(template, image="speechtune:latest") if cluster else dict(template),
    }
    if storage_url:
        spec["storage"] = {"url": storage_url}
    return {"apiVersion": "speechtune.io/v1alpha1", "kind": "SpeechTuningStudy", "metadata": {"name": name}, "spec": spec}


def read_ledger(ledger: Path) -> tuple[dict[int, float], dict[int, float]]:
    starts: dict[int, float] = {}
    ends: dict[int, float] = {}
    if ledger.exists():
        for line in ledger.read_text().splitlines():
            number, what, stamp = line.split()
            (starts if what == "start" else ends)[int(number)] = float(stamp)
    return starts, ends


# -- processes and numbers -------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system time of the process itself (all its threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


# -- the cluster side ------------------------------------------------------------------------
def cluster_access() -> KubeCluster:
    tools = subprocess.run([REPO / "tests" / "cluster" / "tools"], check=True, capture_output=True, text=True).stdout.strip()
    kubeconfig = os.environ.get("KUBECONFIG") or str(DEFAULT_KUBECONFIG)
    os.environ["KUBECONFIG"] = kubeconfig  # our own watches (speechtune.k8s.api) read it too
    env = dict(os.environ, PATH=f"{tools}{os.pathsep}{os.environ.get('PATH', '')}")
    cluster = KubeCluster(kubeconfig, env)
    cluster.kubectl("get", "--raw", "/readyz")
    applied = cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"), check=False)
    if applied.returncode:  # e.g. a CRD being edited in this checkout: run on the installed ones, and say so
        print(f"# warning: crds/ not applied, using the CRDs already installed: {applied.stderr.strip()[:300]}", flush=True)
    for name in ("speechtuningstudies.speechtune.io", "speechtuningtrials.speechtune.io"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=30s")
    return cluster


@contextmanager
def namespace(cluster: KubeCluster, prefix: str):
    """A fresh namespace; at the end, its pods are waited out (their processes are this machine's load)."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    deadline = time.monotonic() + 30
    while cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode:
        if time.monotonic() > deadline:
            raise RuntimeError(f"namespace {name}: no default ServiceAccount after 30 s")
        time.sleep(0.2)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=true", "--timeout=600s", check=False, timeout=660)


@contextmanager
def operator(cluster: KubeCluster, ns: str, storage_url: str, log: Path):
    """`python -m speechtune.k8s -n NS` as a subprocess, serving warm worker pods too; yields (pid, metrics URL) once it is live."""
    metrics_port, health_port, dispatch_port = free_port(), free_port(), free_port()
    env = dict(cluster.env, SPEECHTUNE_STORAGE_URL=storage_url, SPEECHTUNE_METRICS_PORT=str(metrics_port),
               SPEECHTUNE_DISPATCH_PORT=str(dispatch_port), SPEECHTUNE_DISPATCH_URL=f"http://127.0.0.1:{dispatch_port}")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "speechtune.k8s", "-n", ns,
                                 f"--liveness=http://127.0.0.1:{health_port}/healthz"],
                                env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{health_port}/healthz", proc, log)
        yield proc.pid, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        # The operator holds the studies' finalizer: delete them while it runs.
        cluster.kubectl("delete", "speechtuningstudies", "--all", "-n", ns, "--timeout=300s", check=False, timeout=330)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not answering after {timeout:.0f} s: {log.read_text()[-3000:]}")
            time.sleep(0.3)


async def watch_runs(api: Api, ns: str, study: str, seen: dict[str, dict[int, float]], synced: asyncio.Event) -> None:
    """Our arrival times of: each trial's Job, its Complete condition, its pod's Succeeded phase."""
    async def watch(kind: str, record) -> None:
        async for event, obj in api.watch(path(kind, ns), {"labelSelector": f"{STUDY_LABEL}={study}"}):
            synced.set()
            for item in obj["items"] if event == "SYNCED" else [obj]:
                if TRIAL_LABEL in item["metadata"]["labels"]:  # not a warm worker's Job or pod
                    record(int(item["metadata"]["labels"][TRIAL_LABEL]), item.get("status") or {})

    def job(number: int, status: dict) -> None:
        seen["created"].setdefault(number, time.time())
        if any(c["type"] == "Complete" and c["status"] == "True" for c in status.get("conditions") or []):
            seen["completed"].setdefault(number, time.time())

    def pod(number: int, status: dict) -> None:
        if status.get("phase") == "Succeeded":
            seen["pod_succeeded"].setdefault(number, time.time())

    await asyncio.gather(watch("jobs", job), watch("pods", pod))


async def wait_for_state(api: Api, ns: str, name: str, states: tuple[str, ...], timeout: float) -> str:
    async def watch() -> str:
        params = {"fieldSelector": f"metadata.name={name}"}
        async for event, obj in api.watch(path("speechtuningstudies", ns), params):
            for study in obj["items"] if event == "SYNCED" else [obj]:
                state = (study.get("status") or {}).get("state")
                if state in states:
                    return state
        raise AssertionError("unreachable: watches never end")

    return await asyncio.wait_for(watch(), timeout)


def storage_span(url: str, study_name: str) -> tuple[float, int]:
    """(first ask -> last tell in seconds, complete trials), read from the Optuna storage."""
    storage = optuna.storages.RDBStorage(url)
    try:
        trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()
    first = min(t.datetime_start for t in trials)
    last = max(t.datetime_complete for t in trials if t.datetime_complete)
    return (last - first).total_seconds(), sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


# -- overhead ---------------------------------------------------------------------------------------
def overhead_on_operator(args, cluster: KubeCluster, url: str, work: Path, warm: bool = False) -> dict:
    """One Job per trial, or (``warm``) warm worker pods, each trial a run in one of them."""
    ledger = work / f"operator-{uuid.uuid4().hex[:6]}.ledger"
    seen: dict[str, dict[int, float]] = {"created": {}, "completed": {}, "pod_succeeded": {}}
    template = (warm_fake_trainer_template if warm else fake_trainer_template)(ledger, args.trial_seconds)
    body = study_body("overhead", template, args.trials, args.parallelism, cluster=True, storage_url=None)
    with namespace(cluster, "bench-overhead") as ns, operator(cluster, ns, url, work / f"{ns}.operator.log") as (pid, _):
        async def run() -> tuple[float, str]:
            api = Api.from_environment()
            synced = asyncio.Event()
            jobs = asyncio.create_task(watch_runs(api, ns, "overhead", seen, synced))
            try:
                await synced.wait()
                began = time.time()
                study = await api.create(path("speechtuningstudies", ns), body)
                state = await wait_for_state(api, ns, "overhead", ("Succeeded", "Failed"), args.timeout)
                if state != "Succeeded":
                    log = (work / f"{ns}.operator.log").read_text()[-3000:]
                    raise RuntimeError(f"study in {ns} ended {state}; the operator's log ends:\n{log}")
                return time.time() - began, study["metadata"]["uid"]
            finally:
                jobs.cancel()
                await asyncio.gather(jobs, return_exceptions=True)
                await api.close()

        cpu = cpu_seconds(pid)
        wall, uid = asyncio.run(run())
        cpu = cpu_seconds(pid) - cpu
        span, complete = storage_span(url, optuna_study_name(ns, "overhead", uid))
    return dict(overhead_row("operator, worker pods" if warm else "operator", args, wall, span, complete, ledger, seen),
                operator_cores=round(cpu / wall, 3))


def overhead_on_local(args, url: str, work: Path) -> dict:
    ledger = work / f"local-{uuid.uuid4().hex[:6]}.ledger"
    name = f"overhead-local-{uuid.uuid4().hex[:6]}"
    file = work / f"{name}.yaml"
    file.write_text(yaml.safe_dump(study_body(name, fake_trainer_template(ledger, args.trial_seconds), args.trials,
                                              args.parallelism, cluster=False, storage_url=url)))
    began = time.time()
    with open(work / f"{name}.log", "wb") as out:
        subprocess.run([Path(sys.executable).parent / "speechtune", "run", str(file), "--workdir", str(work / name)],
                       stdout=out, stderr=subprocess.STDOUT, check=True, timeout=args.timeout)
    wall = time.time() - began
    span, complete = storage_span(url, name)
    return overhead_row("local runner", args, wall, span, complete, ledger, {})


def slot_gaps(ends: list[float], nexts: list[float], parallelism: int) -> list[float]:
    """The i-th trial to end frees the slot that the (parallelism + i)-th trial takes."""
    ends, nexts = sorted(ends), sorted(nexts)
    return [nexts[parallelism + i] - end for i, end in enumerate(ends[: max(0, len(nexts) - parallelism)])]


def overhead_row(runner: str, args, wall: float, span: float, complete: int, ledger: Path,
                 seen: dict[str, dict[int, float]]) -> dict:
    """``seen``: the cluster's view (Job created, Job Complete, pod Succeeded), empty for the local runner."""
    starts, ends = read_ledger(ledger)
    ideal = args.trials * args.trial_seconds / args.parallelism
    created = list(seen.get("created", {}).values())
    to_job = slot_gaps(list(ends.values()), created, args.parallelism)
    # The operator's own share: from the moment the API showed the pod Succeeded.
    reaction = slot_gaps(list(seen.get("pod_succeeded", {}).values()), created, args.parallelism)
    to_start = slot_gaps(list(ends.values()), list(starts.values()), args.parallelism)
    job_lag = [at - ends[n] for n, at in seen.get("completed", {}).items() if n in ends]
    return {
        "runner": runner, "trials": complete, "wall_s": round(wall, 1), "ideal_s": round(ideal, 1),
        "ratio": round(wall / ideal, 3), "span_s": round(span, 1), "span_ratio": round(span / ideal, 3),
        "trainer_p50_s": round(statistics.median(ends[n] - starts[n] for n in ends if n in starts), 2),
        "gap_job_p50_s": round(percentile(to_job, 0.5), 2) if to_job else None,
        "gap_job_p95_s": round(percentile(to_job, 0.95), 2) if to_job else None,
        "pod_seen_to_job_p50_s": round(percentile(reaction, 0.5), 2) if reaction else None,
        "pod_seen_to_job_p95_s": round(percentile(reaction, 0.95), 2) if reaction else None,
        "gap_start_p50_s": round(percentile(to_start, 0.5), 2),
        "gap_start_p95_s": round(percentile(to_start, 0.95), 2),
        "job_complete_lag_p50_s": round(percentile(job_lag, 0.5), 2) if job_lag else None,
        "load": round(os.getloadavg()[0], 1),
    }


# -- footprint ---------------------------------------------------------------------------------------
def footprint_on_operator(args, cluster: KubeCluster, url: str, work: Path) -> dict:
    ledger = work / f"operator-{uuid.uuid4().hex[:6]}.ledger"
    body = study_body("footprint", sleeper_template(ledger, args.report_every, args.reports), args.running,
                      args.running, cluster=True, storage_url=None)
    with namespace(cluster, "bench-footprint") as ns, operator(cluster, ns, url, work / f"{ns}.operator.log") as (pid, metrics):
        idle_rss = rss_mib(pid)
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
        return footprint_row("operator", args, pid, metrics, ledger, idle_rss)


def footprint_on_local(args, url: str, work: Path) -> dict:
    ledger = work / f"local-{uuid.uuid4().hex[:6]}.ledger"
    name = f"footprint-local-{uuid.uuid4().hex[:6]}"
    file = work / f"{name}.yaml"
    file.write_text(yaml.safe_dump(study_body(name, sleeper_template(ledger, args.report_every, args.reports),
                                              args.running, args.running, cluster=False, storage_url=url)))
    port = free_port()
    log = work / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([Path(sys.executable).parent / "speechtune", "run", str(file), "--workdir",
                                 str(work / name), "--metrics-port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics", proc, log)
        return footprint_row("local runner", args, proc.pid, f"http://127.0.0.1:{port}/metrics", ledger, None)
    finally:
        proc.terminate()  # its trials die with it (PR_SET_PDEATHSIG)
        proc.wait()


def footprint_row(runner: str, args, pid: int, metrics_url: str, ledger: Path, idle_rss: float | None) -> dict:
    """Wait until every trial runs (or ramp_timeout), then measure the runner for ``window`` seconds."""
    began = time.monotonic()
    while len(read_ledger(ledger)[0]) < args.running and time.monotonic() - began < args.ramp_timeout:
        time.sleep(2)
    ramp = time.monotonic() - began
    settle = time.monotonic() + args.report_every  # every trial has reported once: steady state
    while time.monotonic() < settle:
        time.sleep(1)
    before, cpu0, t0 = lag_buckets(metrics_url), cpu_seconds(pid), time.monotonic()
    rss = [rss_mib(pid)]
    while time.monotonic() - t0 < args.window:
        time.sleep(2)
        rss.append(rss_mib(pid))
    cpu1, t1, after = cpu_seconds(pid), time.monotonic(), lag_buckets(metrics_url)
    starts, ends = read_ledger(ledger)
    window = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
    total = window.get(math.inf, 0.0)
    return {
        "runner": runner, "running": len(starts) - len(ends), "ramp_s": round(ramp, 1),
        "idle_rss_mib": round(idle_rss, 1) if idle_rss is not None else None,
        "rss_max_mib": round(max(rss), 1), "rss_end_mib": round(rss[-1], 1),
        "cores": round((cpu1 - cpu0) / (t1 - t0), 3), "window_s": round(t1 - t0, 1),
        "reports": int(total), "lag_p50_s": round(histogram_quantile(0.5, window), 3),
        "lag_p95_s": round(histogram_quantile(0.95, window), 3),
        "lag_within_goal": round(window.get(LAG_GOAL_SECONDS, 0.0) / total, 4) if total else None,
        "load": round(os.getloadavg()[0], 1),
    }


# -- report ----------------------------------------------------------------------------------------
def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join("" if row.get(c) is None else str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def medians(rows: list[dict]) -> list[dict]:
    result = []
    for runner in dict.fromkeys(row["runner"] for row in rows):
        mine = [row for row in rows if row["runner"] == runner]
        median = {"runner": f"{runner} (median of {len(mine)})"}
        for key in mine[0]:
            values = [row[key] for row in mine if isinstance(row.get(key), (int, float))]
            if key != "runner" and values:
                median[key] = round(statistics.median(values), 3)
        result.append(median)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["overhead", "footprint", "both"], default="both")
    parser.add_argument("--runners", nargs="+", choices=["operator", "operator-warm", "local"], default=["operator", "local"],
                        help="operator: one Job per trial; operator-warm: warm worker pods (overhead only); local: speechtune run")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--parallelism", type=int, default=20)
    parser.add_argument("--trial-seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=1, help="overhead runs per runner, interleaved")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one overhead study may take")
    parser.add_argument("--running", type=int, default=500, help="concurrent trials for the footprint")
    parser.add_argument("--report-every", type=float, default=10.0)
    parser.add_argument("--reports", type=int, default=120, help="a footprint trial's reports before it ends")
    parser.add_argument("--window", type=float, default=120.0, help="footprint measurement, seconds")
    parser.add_argument("--ramp-timeout", type=float, default=900.0, help="wait this long for all trials to run")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"# {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.1f} at start", flush=True)
    cluster = cluster_access()
    with ExitStack() as stack:
        url = stack.enter_context(postgres_server()).url
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="speechtune-bench-")))
        if args.part in ("overhead", "both"):
            rows = []
            for _ in range(args.repeats):
                if "operator" in args.runners:
                    rows.append(overhead_on_operator(args, cluster, url, work))
                    print(json.dumps(rows[-1]), flush=True)
                if "operator-warm" in args.runners:
                    rows.append(overhead_on_operator(args, cluster, url, work, warm=True))
                    print(json.dumps(rows[-1]), flush=True)
                if "local" in args.runners:
                    rows.append(overhead_on_local(args, url, work))
                    print(json.dumps(rows[-1]), flush=True)
            print(f"\n## Overhead: {args.trials} trials x {args.trial_seconds:g} s, {args.parallelism} at a time\n")
            print(markdown(rows + (medians(rows) if args.repeats > 1 else [])), flush=True)
        if args.part in ("footprint", "both"):
            rows = []
            if "operator" in args.runners:
                rows.append(footprint_on_operator(args, cluster, url, work))
                print(json.dumps(rows[-1]), flush=True)
            if "local" in args.runners:
                rows.append(footprint_on_local(args, url, work))
                print(json.dumps(rows[-1]), flush=True)
            print(f"\n## Footprint: {args.running} running trials, a report every {args.report_every:g} s, "
                  f"{args.window:g} s window\n")
            print(markdown(rows), flush=True)


if __name__ == "__main__":
    main()
