"""A deterministic stand-in trainer for tests, demos and benchmarks.

Its WER is a smooth function of the parameters it is given and of the step,
printed in the metric protocol like the real trainer does, so studies and
pruning behave realistically in seconds. Known parameters have an optimum
(``OPTIMA``); unknown numeric parameters are ignored, as a trainer ignores
flags it does not use. Fault flags (``--fail-at``, ``--nan-at``, ``--junk``,
``--hang``, and for warm workers ``--raise-at``, ``--oom-at``, ``--forge``) exercise the engine's
error paths. With ``--checkpoint_dir`` it leaves a ``last.ckpt`` there each epoch, naming the
checkpoints it loaded; with ``--init_from`` or any ``--<name>_checkpoint`` (files that must exist,
e.g. a vocoder's frozen acoustic model) its learning curve starts 3 epochs ahead, as a warm-started
model would. ``--derive`` reports parameters on its final line, as an architecture search reports
the architecture it derived. Started with SPEECHTUNE_WORKER=1 it is a warm worker.

    python -m speechtune.fake_trainer --epochs=9 --lr=0.0003 --num_layers=8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib

from speechtune.protocol import pause, report, serve, stop_requested, worker_mode

# name -> (optimum, scale, log-scale?)
OPTIMA: dict[str, tuple[float, float, bool]] = {
    "lr": (3e-4, 1.0, True),
    "learning_rate": (3e-4, 1.0, True),
    "num_layers": (8.0, 4.0, False),
    "encoder_layers": (8.0, 4.0, False),
    "n_mels": (80.0, 40.0, False),
    "win_length_ms": (25.0, 15.0, False),
    "d_model": (512.0, 384.0, False),
    "dropout": (0.1, 0.15, False),
    "freq_masks": (2.0, 2.0, False),
    "time_masks": (2.0, 3.0, False),
    "attention_heads": (4.0, 6.0, False),
    "x": (0.3, 0.5, False),
    "y": (-0.2, 0.5, False),
}
CATEGORICAL_PENALTY = {"lstm": 0.4, "gru": 0.5, "transformer": 0.15, "conformer": 0.0}


def penalty(params: dict[str, str]) -> float:
    """Squared distance from the optimum, in scaled units."""
    total = 0.0
    for name, raw in params.items():
        if raw in CATEGORICAL_PENALTY:
            total += CATEGORICAL_PENALTY[raw]
            continue
        if name not in OPTIMA:
            continue
        optimum, scale, log = OPTIMA[name]
        value = float(raw)
        if log:
            total += ((math.log10(max(value, 1e-12)) - math.log10(optimum)) / scale) ** 2
        else:
            total += ((value - optimum) / scale) ** 2
    return total


def wer(params: dict[str, str], step: int) -> float:
    """The WER after ``step`` epochs: a learning curve toward a floor set by the params."""
    hours = float(params.get("train_hours", 10))
    floor = 0.04 + 0.5 * (1 - math.exp(-penalty(params))) + 0.05 / math.sqrt(max(hours, 0.01))
    curve = floor + (1.0 - floor) * math.exp(-0.45 * step)
    noise = (zlib.crc32(repr((sorted(params.items()), step)).encode()) % 1000 - 500) / 1e5
    return round(min(1.0, max(0.0, curve + noise)), 6)


def measure(params: dict[str, str], step: int, misleading_below_hours: float, flat_below_hours: float = 0.0) -> float:
    value = wer(params, step)
    hours = float(params.get("train_hours", 10))
    if hours < flat_below_hours:
        return 1.0  # too little data to learn anything: every configuration scores the same
    if hours < misleading_below_hours:
        return round(1.0 - value, 6)  # the best configurations look worst
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speechtune.fake_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", "--steps", type=int, default=9, dest="epochs")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per epoch")
    parser.add_argument("--start-epoch", type=int, default=1, help="first epoch, as after a checkpoint resume")
    parser.add_argument("--fail-at", type=int, help="exit 3 at this epoch")
    parser.add_argument("--nan-at", type=int, help="report NaN at this epoch")
    parser.add_argument("--junk", action="store_true", help="print junk lines around the reports")
    parser.add_argument("--hang", action="store_true", help="sleep forever after the first report")
    parser.add_argument("--raise-at", type=int, help="raise an exception at this epoch (a warm worker survives it)")
    parser.add_argument("--oom-at", type=int, help="raise MemoryError at this epoch (a warm worker is replaced)")
    parser.add_argument("--forge", metavar="RUN",
                        help="also report WER 0 for run RUN and untagged, every epoch (a warm worker's backend must ignore both)")
    parser.add_argument("--no-metrics", action="store_true", help="exit 0 without reporting")
    parser.add_argument("--ledger", help="append this trial's number (and attempt) to a file at start (tests count runs)")
    parser.add_argument("--timeline", help="append '<trial> start|end <epoch seconds>' to a file (benchmarks time runs)")
    parser.add_argument("--misleading-below-hours", type=float, default=0.0,
                        help="below this train_hours, rank configurations backwards: a proxy that cannot be trusted")
    parser.add_argument("--flat-below-hours", type=float, default=0.0,
                        help="below this train_hours, report WER 1.0 for every configuration: a proxy that ranks nothing")
    parser.add_argument("--derive", action="append", default=[], metavar="NAME=A|B|...",
                        help="report NAME in the final line's params: one of the choices, picked by the run's parameters")
    known, rest = parser.parse_known_args(argv)
    params = dict(_flag(arg) for arg in rest if arg.startswith("--") and "=" in arg)
    loaded = {name: params.pop(name) for name in list(params) if name == "init_from" or name.endswith("_checkpoint")}
    for name, path in loaded.items():
        if not os.path.isfile(path):
            print(f"fake trainer: error: --{name} {path}: no such checkpoint", file=sys.stderr)
            return 2
    # A warm-started model starts where a cold one is after 3 epochs: transfer, in miniature.
    head_start = 3 if loaded else 0

    def score(step: int) -> float:
        return measure(params, step + head_start, known.misleading_below_hours, known.flat_below_hours)

    if known.ledger:
        with open(known.ledger, "a") as ledger:
            ledger.write(" ".join(filter(None, [os.environ.get("SPEECHTUNE_TRIAL", "?"), os.environ.get("SPEECHTUNE_ATTEMPT")])) + "\n")
    if known.timeline:
        _timeline(known.timeline, "start")
    try:
        return _train(known, params, score, loaded)
    finally:
        if known.timeline:
            _timeline(known.timeline, "end")


def _timeline(path: str, what: str) -> None:
    with open(path, "a") as timeline:
        timeline.write(f"{os.environ.get('SPEECHTUNE_TRIAL', '?')} {what} {time.time():.6f}\n")


def _train(known: argparse.Namespace, params: dict, score, loaded: dict[str, str]) -> int:
    if known.no_metrics:
        print("training... done (but forgot to report)")
        return 0
    for epoch in range(known.start_epoch, known.epochs + 1):
        if known.sleep:
            pause(known.sleep)
        if stop_requested():
            return 0  # the worker ends the run as stopped
        if known.fail_at == epoch:
            print(f"fake trainer: simulated crash at epoch {epoch}", file=sys.stderr)
            return 3
        if known.raise_at == epoch:
            raise RuntimeError(f"fake trainer: simulated exception at epoch {epoch}")
        if known.oom_at == epoch:
            raise MemoryError(f"fake trainer: simulated out of memory at epoch {epoch}")
        if known.junk:
            _junk()
        value = float("nan") if known.nan_at == epoch else score(epoch)
        report(step=epoch, wer=value, cer=value / 2)
        if known.forge:
            _forge(known.forge, epoch)
        if params.get("checkpoint_dir"):  # a stand-in for the model: what a warm start would load
            os.makedirs(params["checkpoint_dir"], exist_ok=True)
            with open(os.path.join(params["checkpoint_dir"], "last.ckpt"), "w") as checkpoint:
                json.dump({"params": params, "epoch": epoch, "loaded": loaded}, checkpoint)
        if known.hang:
            time.sleep(10**6)
    derived = {name: _pick(choices.split("|"), params) for name, choices in (item.split("=", 1) for item in known.derive)}
    report(final=True, wer=score(known.epochs), **({"params": derived} if derived else {}))
    return 0


def _pick(choices: list[str], params: dict[str, str]) -> str | float:
    """One of ``choices``, fixed by the run's parameters; a number stays a number."""
    choice = choices[zlib.crc32(repr(sorted(params.items())).encode()) % len(choices)]
    try:
        return float(choice) if "." in choice else int(choice)
    except ValueError:
        return choice


class InProcessRun:
    """The fake trainer's protocol lines, computed in-process: a trainer that costs nothing."""

    def __init__(self, params: dict, epochs: int):
        self.params = {name: str(value) for name, value in params.items()}
        self.epochs = epochs

    async def lines(self):
        for step in range(1, self.epochs + 1):
            yield json.dumps({"speechtune": 1, "step": step, "wer": wer(self.params, step)}).encode()

    async def wait(self):
        from speechtune.backend import Exit

        return Exit(succeeded=True, exit_code=0)

    async def stop(self) -> None:
        pass


class InProcessBackend:
    """A backend running the fake trainer in-process: for sampler statistics and overhead benchmarks."""

    recovery_grace_seconds = 0.0

    def __init__(self, epochs: int = 9):
        self.epochs = epochs

    async def launch(self, launch) -> InProcessRun:
        return InProcessRun(launch.values, self.epochs)

    async def attach(self, study: str, number: int, attempt: str = "") -> None:
        return None


def _flag(arg: str) -> tuple[str, str]:
    name, value = arg[2:].split("=", 1)
    return name.replace("-", "_"), value


def _forge(other_run: str, epoch: int) -> None:
    if not other_run.startswith(f"trial-{os.environ.get('SPEECHTUNE_TRIAL')}@"):  # a run that would forge itself only reports
        print(json.dumps({"speechtune": 1, "run": other_run, "step": epoch, "wer": 0.0}))
    print(json.dumps({"speechtune": 1, "step": epoch, "wer": 0.0}), flush=True)


def _junk() -> None:
    out = sys.stdout.buffer
    out.write(b'{"speechtune": 1, "step": "three", "wer": 0.0}\n')  # wrong type
    out.write(b'{"speechtune": 2, "step": 1, "wer": 0.0}\n')  # unknown protocol version
    out.write(b'{"loss": 0.1, "step": 1}\n')  # someone else's JSON
    out.write(b"\xff\xfe\x00binary\x00junk\n")
    out.write(b'{"speechtune": 1, "step": 1, "wer": 0.0, "pad": "' + b"x" * (70 * 1024) + b'"}\n')  # over 64 KiB
    out.write(b"epoch done " + os.urandom(32).replace(b"\n", b"") + b"\n")
    out.flush()


if __name__ == "__main__":
    sys.exit(serve(main) if worker_mode() else main())
