"""Per-epoch protocol lines: WER from NeMo's validation, CER from the same decoded hypotheses, NeMo's validation
loss (val_loss: the CTC, RNN-T or attention decoder's cross-entropy loss on the dev set, which moves before WER does), epoch time
(and the peak GPU memory on CUDA).

NeMo's models compute WER only; decoding the dev set a second time for CER would double
validation time for transducers, so ErrorCounter reuses the hypotheses NeMo's WER
metric already decoded.

Under DDP each process validates its share of the dev set. NeMo's WER metric (torchmetrics,
`sync_on_compute`) already sums its word counts over the processes at every validation step;
ErrorCounter's counts are summed and val_loss averaged over them here, so every printed number
is over the whole dev set. Only global rank 0 prints.
"""

from __future__ import annotations

import sys
import time

import torch
from kaldialign import edit_distance  # what NeMo's WER metric uses
from lightning.pytorch import Callback, LightningModule, Trainer

from speechtune.protocol import report


class ErrorCounter:
    """Wraps a NeMo WER metric so each `update` also counts the character (and word) edits of its hypotheses."""

    FIELDS = ("char_edits", "chars", "word_edits", "words", "utterances")

    def __init__(self, wer_metric) -> None:
        self.reset()
        decoded: list = []
        decode, update = wer_metric.decode, wer_metric.update

        def recording_decode(*args, **kwargs):
            decoded[:] = decode(*args, **kwargs)
            return decoded

        def counting_update(*, targets, targets_lengths, **kwargs):
            decoded.clear()
            update(targets=targets, targets_lengths=targets_lengths, **kwargs)
            for hypothesis, target, length in zip(decoded, targets.cpu(), targets_lengths.cpu()):
                hypothesis = hypothesis[0] if isinstance(hypothesis, list) else hypothesis
                reference = wer_metric.decoding.decode_ids_to_str(target[: int(length)].tolist())
                self.counts["char_edits"] += edit_distance(list(reference), list(hypothesis.text))["total"]
                self.counts["chars"] += len(reference)
                self.counts["word_edits"] += edit_distance(reference.split(), hypothesis.text.split())["total"]
                self.counts["words"] += len(reference.split())
                self.counts["utterances"] += 1

        wer_metric.decode = recording_decode
        wer_metric.update = counting_update

    def reset(self) -> None:
        self.counts = dict.fromkeys(self.FIELDS, 0)

    def sum_over_processes(self, trainer: Trainer, device: torch.device) -> None:
        """Replace this process's counts by their sums over all processes (every process must call this)."""
        if trainer.world_size == 1:
            return
        local = torch.tensor([self.counts[field] for field in self.FIELDS], dtype=torch.float64, device=device)
        summed = trainer.strategy.reduce(local, reduce_op="sum")
        self.counts = dict(zip(self.FIELDS, (int(value) for value in summed.tolist())))

    @staticmethod
    def ratio(edits: int, total: int) -> float:
        return edits / total if total else float("nan")

    @property
    def cer(self) -> float:
        return self.ratio(self.counts["char_edits"], self.counts["chars"])

    @property
    def wer(self) -> float:
        return self.ratio(self.counts["word_edits"], self.counts["words"])


class ProtocolReporter(Callback):
    """Prints one protocol line per validated epoch (1-based) and remembers it for the final line.

    The last line is saved in checkpoints, so a run resumed after its last epoch can still print a final line.
    """

    def __init__(self, cer: ErrorCounter) -> None:
        self.cer = cer
        self.epoch_started = time.monotonic()
        self.last: dict[str, float] | None = None

    def state_dict(self) -> dict:
        return {"last": self.last}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last = state_dict["last"]

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epoch_started = time.monotonic()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.cer.reset()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.cer.sum_over_processes(trainer, pl_module.device)  # collective: before any rank-0-only branch
        self.last = {
            "wer": float(trainer.callback_metrics["val_wer"]),  # NeMo's metric, already over all processes
            "cer": self.cer.cer,
            "epoch_seconds": round(time.monotonic() - self.epoch_started, 3),
        }
        loss = trainer.callback_metrics.get("val_loss")  # NeMo logs it with val_wer (RNN-T: unless compute_eval_loss is off)
        if loss is not None:
            # NeMo logs each process's mean over its batches; all have as many batches (DistributedSampler pads).
            self.last["val_loss"] = float(trainer.strategy.reduce(loss.detach().to(pl_module.device), reduce_op="mean"))
        if pl_module.device.type == "cuda":
            # This process's; under DDP every process holds the same model and batch size.
            self.last["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(pl_module.device) / 2**30, 3)
        if not trainer.is_global_zero:
            return
        if trainer.world_size > 1:
            counts = self.cer.counts
            print(
                f"epoch {trainer.current_epoch + 1}: validated {counts['utterances']} dev utterances on {trainer.world_size} "
                f"processes ({counts['words']} words, {counts['chars']} characters); WER of the summed counts {self.cer.wer:.6f}",
                file=sys.stderr,
            )
        report(step=trainer.current_epoch + 1, **self.last)
