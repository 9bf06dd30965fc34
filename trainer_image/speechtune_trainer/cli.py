"""The `speechtune-trainer` command: `make-data`, `asr`, `nas-darts` (darts.py), and `tts-acoustic`/`tts-vocoder` (tts/commands.py).

The tuning engine appends sampled parameters as `--<param>=<value>` with underscores
(`--n_mels=64`) after the template's own args, so every flag is also accepted with
underscores, and a repeated flag takes its last value. Started with SPEECHTUNE_WORKER=1,
it is a warm worker that executes many runs in-process (worker.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from speechtune.protocol import worker_mode
from speechtune_trainer import config, darts
from speechtune_trainer.tts import commands as tts_commands


def with_dashes(argv: list[str]) -> list[str]:
    """Rewrite `--n_mels=64` as `--n-mels=64`; values are left alone."""
    rewritten = []
    for token in argv:
        if token.startswith("--"):
            name, sep, value = token.partition("=")
            token = name.replace("_", "-") + sep + value
        rewritten.append(token)
    return rewritten


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speechtune-trainer", description="NeMo trainer for speechtune trials")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("make-data", help="synthesise a speech corpus with espeak-ng and write NeMo manifests")
    data.add_argument("--out", type=Path, required=True)
    data.add_argument("--hours", type=float, default=0.2, help="hours of audio over train+dev+test (default 0.2)")
    data.add_argument("--sample-rate", type=int, default=16000)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--vocabulary", choices=("digits", "commands"), default="digits")
    data.add_argument("--language", choices=("en", "es"), default="en", help="the words and the espeak-ng voices")
    data.add_argument("--snr-db", type=float, default=None, help="add white noise at this signal-to-noise ratio")
    data.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel espeak-ng/sox processes")
    tts_commands.add_make_data_arguments(data)

    asr = commands.add_parser("asr", help="train one NeMo ASR model and print protocol lines")
    config.add_arguments(asr)
    darts.add_arguments(commands.add_parser(darts.COMMAND, help=darts.HELP))
    tts_commands.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None and worker_mode():
        from speechtune_trainer.worker import serve

        return serve()
    parser = build_parser()
    args = parser.parse_args(with_dashes(sys.argv[1:] if argv is None else argv))
    if args.command == "make-data":
        if not args.hours > 0 or args.sample_rate < 1:
            parser.error("make-data: --hours and --sample-rate must be positive")
        if args.tts:
            return tts_commands.make_data(args)
        from speechtune_trainer.data import make_data

        make_data(args.out, args.hours, args.sample_rate, args.seed, args.vocabulary, args.snr_db, args.workers, args.language)
        return 0
    if args.command in tts_commands.COMMANDS:
        return tts_commands.run(args)
    if args.command == darts.COMMAND:
        problems = darts.problems(args)
        if problems:
            print(f"speechtune-trainer {darts.COMMAND}: error: " + "\n  ".join(["invalid flags:", *problems]), file=sys.stderr)
            return 2
        from speechtune_trainer.darts_search import search

        return search(args)
    problems = config.problems(args)
    if problems:
        print("speechtune-trainer asr: error: " + "\n  ".join(["invalid flags:", *problems]), file=sys.stderr)
        return 2
    from speechtune_trainer.train import train

    return train(args, own_command_line=argv is None)  # DDP reruns this process's command line


if __name__ == "__main__":
    sys.exit(main())
