"""`nas-darts`: its flags, their checks and the final line's parameters. Plain Python, no torch (see config.py).

`nas-darts` takes every `asr` flag (the supernet's fixed settings: audio, width, heads, SpecAugment,
optimiser, data, run) plus the search's own. What it searches -- each layer's block -- is what
`asr --conformer-blocks` builds, so its final line's `params` retrain the derived network from scratch:
`speechtune-trainer asr <the same flags> --num-layers=N --conformer-blocks=...` (docs/trainer.md,
"Weight-sharing search: nas-darts"). darts_search.py builds and trains the supernet.
"""

from __future__ import annotations

import argparse
import math

from speechtune_trainer import blocks, config

COMMAND = "nas-darts"
HELP = "first-order DARTS over each Conformer layer's block; the final line's params are asr flags"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser)
    search = parser.add_argument_group("search (nas-darts)")
    search.add_argument(
        "--candidates", default=blocks.DEFAULT_CANDIDATES,
        help="the operations mixed at every layer, in --conformer-blocks' grammar "
        f"(default: kernels {'/'.join(map(str, blocks.DEFAULT_KERNELS))} x expansions "
        f"{'/'.join(map(str, blocks.DEFAULT_EXPANSIONS))} x att/noatt, and skip: 13)",
    )
    search.add_argument(
        "--arch-split", type=float, default=0.5,
        help="the share of the train manifest held out for the architecture steps; the rest trains the weights",
    )
    search.add_argument(
        "--arch-lr", type=float, default=1e-2,
        help="Adam's learning rate for the architecture weights (Adam moves each by about this per step)",
    )
    search.add_argument("--arch-weight-decay", type=float, default=1e-3, help="on the architecture weights (DARTS': 1e-3)")


def problems(args: argparse.Namespace) -> list[str]:
    """The asr checks, the flags the search cannot honour, and the search's own."""
    found = []
    if args.encoder != "conformer":
        found.append(f"--encoder {args.encoder}: nas-darts searches Conformer blocks; use --encoder conformer")
    if args.decoder != "ctc":
        found.append(f"--decoder {args.decoder}: nas-darts trains the supernet with CTC; use --decoder ctc")
    if args.conformer_blocks is not None:
        found.append("--conformer-blocks is what nas-darts derives; give the candidates with --candidates")
    if args.residual_scale is not None or args.skip_connections != "none":
        found.append(
            "--residual-scale and --skip-connections do not apply to nas-darts' supernet; give them to the retraining asr run"
        )
    if args.init_from is not None:
        found.append("--init-from does not apply to nas-darts (the supernet starts from scratch)")
    for flag in ("devices", "num_nodes"):
        if getattr(args, flag) not in (None, 1):
            found.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}: nas-darts runs in one process on one device")
    if args.precision == "16-mixed":
        found.append("--precision 16-mixed does not apply to nas-darts (no loss scaling); use bf16-mixed or 32")
    try:
        candidates = blocks.parse_list(args.candidates)
    except ValueError as error:
        found.append(f"--candidates {args.candidates!r}: {error}")
    else:
        repeated = sorted({str(block) for block in candidates if candidates.count(block) > 1})
        if repeated:
            found.append(f"--candidates repeats {', '.join(repeated)}")
        if len(candidates) < 2:
            found.append(f"--candidates has {len(candidates)} operation; a search needs at least 2")
    if not 0 < args.arch_split < 1:
        found.append(f"--arch-split is the share of the train manifest held out, in (0, 1); got {args.arch_split}")
    if not 0 < args.arch_lr < math.inf:
        found.append(f"--arch-lr must be positive, got {args.arch_lr}")
    if args.arch_weight_decay < 0:
        found.append(f"--arch-weight-decay must not be negative, got {args.arch_weight_decay}")
    return found + config.problems(args)


def split(lines: list[str], share: float) -> tuple[list[str], list[str]]:
    """Utterances for the weight steps and for the architecture steps: `share` of them, spread evenly over the manifest."""
    weights, arch = [], []
    for index, line in enumerate(lines):
        (arch if math.floor((index + 1) * share) > math.floor(index * share) else weights).append(line)
    return weights, arch


def final_params(derived: list[blocks.Block]) -> dict[str, int | str]:
    """The asr flags (underscored, as the engine appends them) that build the derived network."""
    return {"num_layers": len(derived), "conformer_blocks": blocks.format_list(derived)}
