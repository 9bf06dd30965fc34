"""The TTS commands of `speechtune-trainer`: `make-data --tts`, `tts-acoustic`, `tts-vocoder`.

Registered by ../cli.py. The flags are checked before torch or NeMo is imported; a bad value
exits 2 with every problem, each naming its flag, as `asr` does.
"""

from __future__ import annotations

import argparse
import sys

from speechtune_trainer.tts import config

COMMANDS = {
    "tts-acoustic": (config.add_acoustic_arguments, config.acoustic_problems),
    "tts-vocoder": (config.add_vocoder_arguments, config.vocoder_problems),
}
HELP = {
    "tts-acoustic": "train NeMo's FastPitch (learned alignment, characters) and print TTS objectives",
    "tts-vocoder": "train NeMo's HiFi-GAN on ground-truth mels or a frozen acoustic model's, and print TTS objectives",
}


def add_make_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tts", action="store_true",
        help="a single-speaker TTS corpus: one voice, pitch contours and DATA/tts.json (pitch statistics)",
    )
    parser.add_argument("--voice", default=None, help="--tts: the espeak-ng voice (default: the language's first, e.g. en)")


def register(commands) -> None:
    for name, (add_arguments, _) in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=HELP[name]))


def make_data(args: argparse.Namespace) -> int:
    from speechtune_trainer.tts.data import make_tts_data

    stats = make_tts_data(args.out, args.hours, args.sample_rate, args.seed, args.vocabulary, args.language, args.voice, args.workers)
    print(f"pitch over voiced train frames: mean {stats['pitch_mean']:.1f} Hz, std {stats['pitch_std']:.1f} Hz", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    problems = COMMANDS[args.command][1](args)
    if problems:
        print(f"speechtune-trainer {args.command}: error: " + "\n  ".join(["invalid flags:", *problems]), file=sys.stderr)
        return 2
    if args.command == "tts-acoustic":
        from speechtune_trainer.tts.acoustic import train_acoustic

        return train_acoustic(args)
    from speechtune_trainer.tts.vocoder import train_vocoder

    return train_vocoder(args)
