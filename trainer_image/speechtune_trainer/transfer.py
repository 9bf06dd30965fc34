"""`--init-from`: start a run from another model's weights, e.g. a model trained on another language.

The run keeps its own architecture (its flags); of the source's tensors, those whose names
and shapes match are copied. The output layers have one row per label plus the blank
(NeMo's last index), so a source with another character set would not fit: their rows are
mapped by character instead, the shared characters' rows copied, new characters keeping
their fresh initialisation, and the source's blank row copied to the new blank row.
"""

from __future__ import annotations

import io
import pickle
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

# Tensors with one row per label plus the blank: CTC output (also a hybrid's), transducer joint
# output, prediction-network embedding.
VOCABULARY_ROWS = re.compile(r"(ctc_decoder|decoder)\.decoder_layers\.0\.|joint\.joint_net\.\d+\.|decoder\.prediction\.embed\.")
# Names that differ for the same layer: the joint's output is joint_net.2, or .1 without dropout;
# the CTC output is `decoder.` in a CTC model, `ctc_decoder.` in a hybrid.
ALIASES = ((re.compile(r"^joint\.joint_net\.\d+\."), "joint.joint_net.out."), (re.compile(r"^ctc_decoder\."), "decoder."))
# Built from this run's flags (sample rate, window, mels), so never taken from the source.
DERIVED = "preprocessor."
# The transformer decoder of --decoder attention (attention.py).
ATTENTION_DECODER = "transf_decoder."


class IncompatibleCheckpoint(Exception):
    """The file is no model checkpoint, or too little of it fits this run's model."""


@dataclass
class Transfer:
    state: dict[str, torch.Tensor]
    copied: int = 0
    mapped: int = 0
    skipped: int = 0  # the name matched but the shape did not
    absent: int = 0  # this model has it, the source does not
    shared: int | None = None  # characters in both label sets; None when the source's are unknown

    def summary(self, path: Path, labels: list[str]) -> str:
        shared = "source labels unknown" if self.shared is None else f"{self.shared} of {len(labels)} characters shared"
        return (
            f"init-from {path}: {self.copied} tensors copied, {self.mapped} mapped by character ({shared}), "
            f"{self.skipped} skipped (shape), {self.absent} not in the checkpoint"
        )


def source_labels(cfg) -> list[str] | None:
    """The character vocabulary in a NeMo model config: our `labels`, or a decoder's `vocabulary`."""
    for keys in (("labels",), ("decoder", "vocabulary"), ("joint", "vocabulary"), ("aux_ctc", "decoder", "vocabulary")):
        node = cfg
        for key in keys:
            node = node.get(key) if hasattr(node, "get") else None
        if node:
            return [str(label) for label in node]
    return None


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """The state dict and labels of a Lightning `.ckpt` (NeMo keeps its config in `hyper_parameters.cfg`) or a `.nemo`."""
    try:
        if path.suffix == ".nemo":
            with tarfile.open(path) as archive:  # NeMo writes `./model_config.yaml` and `./model_weights.ckpt`
                members = {Path(member.name).name: member for member in archive.getmembers()}
                cfg = yaml.safe_load(archive.extractfile(members["model_config.yaml"]))
                weights = io.BytesIO(archive.extractfile(members["model_weights.ckpt"]).read())
            return torch.load(weights, map_location="cpu", weights_only=True), source_labels(cfg)
        # Not weights_only: the hyper-parameters are an OmegaConf config. Load only checkpoints you trust.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        return checkpoint["state_dict"], source_labels(checkpoint.get("hyper_parameters", {}).get("cfg"))
    except (KeyError, TypeError, AttributeError, EOFError, OSError, RuntimeError, pickle.UnpicklingError, tarfile.TarError,
            yaml.YAMLError) as error:
        kind = "NeMo .nemo archive" if path.suffix == ".nemo" else "Lightning checkpoint with a state_dict"
        raise IncompatibleCheckpoint(f"not a readable {kind} ({type(error).__name__}: {error})") from error


def canonical(name: str) -> str:
    """The name to match tensors by, the same for a layer whatever its model's dropout or decoder."""
    for pattern, replacement in ALIASES:
        name = pattern.sub(replacement, name)
    return name


def transfer(
    target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], from_labels: list[str] | None, labels: list[str]
) -> Transfer:
    """`target` (the fresh model's state dict) with every tensor that fits taken from `source`.

    Raises IncompatibleCheckpoint when fewer than half of the model's tensors fit: another
    architecture, whose few matching tensors (say the subsampling) would be no head start.
    """
    by_name = {canonical(name): tensor for name, tensor in source.items()}
    result = Transfer(state=dict(target))
    # Target row -> source row, labels then blank; None when the rows already line up (or nothing says how they would).
    rows = None
    if from_labels is not None:
        result.shared = len(set(labels) & set(from_labels))
        if from_labels != labels:
            rows = {row: from_labels.index(label) for row, label in enumerate(labels) if label in from_labels}
            rows[len(labels)] = len(from_labels)
    considered = 0
    for name, fresh in target.items():
        if name.startswith(DERIVED):
            continue
        considered += 1
        old = by_name.get(canonical(name))
        if old is None:
            result.absent += 1
        elif rows is not None and VOCABULARY_ROWS.match(name):
            if old.shape[0] != len(from_labels) + 1 or old.shape[1:] != fresh.shape[1:]:
                result.skipped += 1
                continue
            remapped = fresh.clone()  # characters new to this run keep their fresh rows
            remapped[torch.tensor(list(rows))] = old[torch.tensor(list(rows.values()))].to(fresh.dtype)
            result.state[name] = remapped
            result.mapped += 1
        elif old.shape == fresh.shape:
            result.state[name] = old.to(fresh.dtype)
            result.copied += 1
        else:
            result.skipped += 1
    if 2 * (result.copied + result.mapped) < considered:
        raise IncompatibleCheckpoint(
            f"incompatible with this model: only {result.copied + result.mapped} of its {considered} tensors match by "
            "name and shape (another --encoder, --num-layers or --d-model?)"
        )
    return result


def decoder_kind(state: dict[str, torch.Tensor]) -> str:
    return "attention" if any(name.startswith(ATTENTION_DECODER) for name in state) else "ctc, transducer or hybrid"


def attention_problem(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], same_labels: bool) -> str | None:
    """Why an attention decoder cannot start from `source`: it and the other decoders share only the encoder (too
    little to count as a head start), and its token rows (special tokens first) are not mapped by character."""
    if decoder_kind(target) != decoder_kind(source):
        return (
            f"its decoder is {decoder_kind(source)}, this run's is {decoder_kind(target)}: the two share only the "
            "encoder; start --decoder attention from an attention model, the others from one of theirs"
        )
    if decoder_kind(target) == "attention" and not same_labels:
        return "an attention model with other labels: its token rows are not mapped by character; give the same --labels"
    return None


def init_from(model: torch.nn.Module, path: Path, labels: list[str]) -> str:
    """Load what fits of the checkpoint at `path` into `model`; return the one-line summary."""
    source, from_labels = read_checkpoint(path)
    problem = attention_problem(model.state_dict(), source, from_labels is None or from_labels == labels)
    if problem:
        raise IncompatibleCheckpoint(problem)
    result = transfer(model.state_dict(), source, from_labels, labels)
    model.load_state_dict(result.state)
    return result.summary(path, labels)
