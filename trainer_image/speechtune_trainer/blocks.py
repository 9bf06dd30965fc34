"""Conformer block specifications: `asr --conformer-blocks` and `nas-darts --candidates` share this grammar.

A block is `k<kernel>-ff<expansion>-att` or `k<kernel>-ff<expansion>-noatt` (a NeMo Conformer layer with
that depthwise convolution kernel, feed-forward width d_model x expansion, with or without its
self-attention module), or `skip` (no block: the position passes its input on). A list is comma-separated:
`k15-ff4-att,k7-ff2-noatt,skip`. Plain Python (no torch), so the flags are checked before torch's import.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

SKIP = "skip"
_PATTERN = re.compile(r"k(\d+)-ff(\d+)-(att|noatt)")
DEFAULT_KERNELS = (7, 15, 31)
DEFAULT_EXPANSIONS = (2, 4)


@dataclass(frozen=True)
class Block:
    """One position of a Conformer stack; `kernel` is None for `skip`."""

    kernel: int | None = None
    expansion: int | None = None
    attention: bool = True

    @property
    def skip(self) -> bool:
        return self.kernel is None

    def __str__(self) -> str:
        if self.skip:
            return SKIP
        return f"k{self.kernel}-ff{self.expansion}-{'att' if self.attention else 'noatt'}"


def parse(text: str) -> Block:
    """One block; ValueError (its message names the wrong part) for anything else."""
    text = text.strip()
    if text == SKIP:
        return Block()
    match = _PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a block: expected k<kernel>-ff<expansion>-att|noatt (e.g. k15-ff4-att) or skip")
    kernel, expansion = int(match[1]), int(match[2])
    if kernel % 2 == 0:  # NeMo pads the depthwise convolution symmetrically
        raise ValueError(f"{text!r}: the kernel size must be odd, got {kernel}")
    if expansion < 1:
        raise ValueError(f"{text!r}: the feed-forward expansion must be at least 1, got {expansion}")
    return Block(kernel, expansion, match[3] == "att")


def parse_list(text: str) -> list[Block]:
    """A comma-separated list of blocks; ValueError naming the first wrong entry."""
    if not text.strip():
        raise ValueError("is empty")
    return [parse(part) for part in text.split(",")]


def format_list(blocks: list[Block]) -> str:
    return ",".join(map(str, blocks))


def default_candidates() -> list[Block]:
    """Every kernel x expansion x (with, without attention), then skip: 13 operations per position."""
    product = itertools.product(DEFAULT_KERNELS, DEFAULT_EXPANSIONS, (True, False))
    return [Block(kernel, expansion, attention) for kernel, expansion, attention in product] + [Block()]


DEFAULT_CANDIDATES = format_list(default_candidates())
