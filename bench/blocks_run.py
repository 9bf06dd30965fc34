"""The black-box arms' trial command in bench/nas_search.py: per-position parameters -> `--conformer_blocks`.

    python bench/blocks_run.py speechtune-trainer asr <flags> --block_0=conformer --kernel_0=7 --ff_0=4 --att_0=att \\
        --block_1=skip [--kernel_1=15 --ff_1=2 --att_1=noatt] --lr=0.003

The search space has, for each position i, `block_i` in {conformer, skip} and `kernel_i`, `ff_i`, `att_i`
(conditional on `block_i: [conformer]`, or flat: then drawn for a skip too, and ignored here). This takes
those flags out of the command line, appends `--num_layers=<positions> --conformer_blocks=k7-ff4-att,skip`
(the grammar `nas-darts` derives in, docs/trainer.md), and runs the rest under bench/timed_run.py, so the
run's CPU-seconds are stored with its trial. Every other flag passes through unchanged.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timed_run  # noqa: E402

_POSITION = re.compile(r"--(block|kernel|ff|att)_(\d+)=(.*)")


def blocks_argv(argv: list[str]) -> list[str]:
    """``argv`` without the per-position flags, plus ``--num_layers`` and ``--conformer_blocks`` built from them."""
    rest, found = [], {}
    for arg in argv:
        match = _POSITION.fullmatch(arg)
        if match is None:
            rest.append(arg)
        else:
            found[match[1], int(match[2])] = match[3]
    positions = sorted(i for kind, i in found if kind == "block")
    if not positions:
        return rest
    if positions != list(range(len(positions))):
        raise SystemExit(f"blocks_run: positions {positions} are not 0..{len(positions) - 1}")
    blocks = []
    for i in positions:
        if found["block", i] == "skip":
            blocks.append("skip")
            continue
        missing = [kind for kind in ("kernel", "ff", "att") if (kind, i) not in found]
        if missing:
            raise SystemExit(f"blocks_run: position {i} is a conformer block without {', '.join(f'--{k}_{i}' for k in missing)}")
        blocks.append(f"k{found['kernel', i]}-ff{found['ff', i]}-{found['att', i]}")
    return [*rest, f"--num_layers={len(blocks)}", f"--conformer_blocks={','.join(blocks)}"]


if __name__ == "__main__":
    sys.exit(timed_run.main(blocks_argv(sys.argv[1:])))
