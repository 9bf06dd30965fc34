"""Per-epoch protocol lines: WER from NeMo's validation, CER from the same decoded hypotheses, NeMo's validation
loss (val_loss: the CTC or RNN-T loss on the dev set, which moves before WER does), epoch time
(and the peak GPU memory on CUDA).

NeMo's models compute WER only; decoding the dev set a second time for CER would double
validation time for transducers, so CharErrorCounter reuses the hypotheses NeMo's WER
metric already decoded.
"""

from __future__ import annotations

import time

import torch
from kaldialign import edit_distance  # what NeMo's WER metric uses
from lightning.pytorch import Callback, LightningModule, Trainer

from speechtune.protocol import report


class CharErrorCounter:
    """Wraps a NeMo WER metric so each `update` also counts character edits of its hypotheses."""

    def __init__(self, wer_metric) -> None:
        self.edits = 0
        self.chars = 0
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
                self.edits += edit_distance(list(reference), list(hypothesis.text))["total"]
                self.chars += len(reference)

        wer_metric.decode = recording_decode
        wer_metric.update = counting_update

    def reset(self) -> None:
        self.edits = 0
        self.chars = 0

    @property
    def cer(self) -> float:
        return self.edits / self.chars if self.chars else float("nan")


class ProtocolReporter(Callback):
    """Prints one protocol line per validated epoch (1-based) and remembers it for the final line.

    The last line is saved in checkpoints, so a run resumed after its last epoch can still print a final line.
    """

    def __init__(self, cer: CharErrorCounter) -> None:
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
        self.last = {
            "wer": float(trainer.callback_metrics["val_wer"]),
            "cer": self.cer.cer,
            "epoch_seconds": round(time.monotonic() - self.epoch_started, 3),
        }
        loss = trainer.callback_metrics.get("val_loss")  # NeMo logs it with val_wer (RNN-T: unless compute_eval_loss is off)
        if loss is not None:
            self.last["val_loss"] = float(loss)
        if pl_module.device.type == "cuda":
            self.last["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(pl_module.device) / 2**30, 3)
        report(step=trainer.current_epoch + 1, **self.last)
