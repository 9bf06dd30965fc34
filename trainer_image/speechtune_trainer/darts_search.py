"""`nas-darts`: first-order DARTS (Liu et al., 2019) over each Conformer layer's block, on NeMo's CTC model.

The supernet is NeMo's EncDecCTCModel (its preprocessor, SpecAugment, CTC decoder, loss and WER metric,
built from config.model_config as `asr` builds them) whose encoder is SupernetEncoder: NeMo's
ConformerEncoder with every layer replaced by a MixedLayer. A MixedLayer runs each candidate block
(encoders.conformer_block: a NeMo ConformerLayer of that kernel, expansion and attention; skip: its input)
and sums their outputs weighted by the softmax of its architecture weights (alpha).

Each weight-training batch is one architecture step then one weight step (first order: the architecture
gradient is taken at the current weights, without DARTS' second-order unrolled step):
  - architecture: Adam on the alphas only, the CTC loss of a batch of the held-out split (--arch-split);
  - weights: AdamW and the asr lr schedule on every other parameter, the CTC loss of a train-split batch.
Each optimiser steps only its own parameters, so a weight step leaves the alphas unchanged and vice versa.

After each epoch the dev set is decoded by the derived network (each layer's argmax block, with the
supernet's weights) and one protocol line is printed: its WER, CER and CTC loss, and arch_entropy, the mean
over layers of the entropy (nats) of the softmaxed alphas (ln of the candidate count when undecided, 0 when
certain). The final line carries the derived network as asr flags (darts.final_params).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from nemo.collections.asr import modules as nemo_modules
from nemo.core.classes import common
from speechtune.protocol import RunStopped, report, stop_requested
from speechtune_trainer import blocks, config, darts, encoders
from speechtune_trainer.train import CHECKPOINT, cpu_budget, training_manifest

TARGET_PREFIX = f"{__name__}."


class MixedLayer(nn.Module):
    """One layer position of the supernet: the softmax(alpha)-weighted sum of its candidates' outputs.

    Called as a NeMo ConformerLayer is (x, att_mask, pos_emb, pad_mask). With `derived` set it runs
    only the argmax candidate, as the derived network would.
    """

    def __init__(self, candidates: list[blocks.Block], template: nn.Module) -> None:
        super().__init__()
        self.candidates = candidates
        self.ops = nn.ModuleList(nn.Identity() if block.skip else encoders.conformer_block(block, template) for block in candidates)
        self.alpha = nn.Parameter(1e-3 * torch.randn(len(candidates)))  # DARTS' initialisation: nearly uniform
        self.derived = False

    def choice(self) -> blocks.Block:
        return self.candidates[int(self.alpha.argmax())]

    def entropy(self) -> float:
        probabilities = torch.softmax(self.alpha.detach().float(), dim=0)
        return float(-(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum())

    def _run(self, index: int, x: torch.Tensor, **kwargs) -> torch.Tensor:
        op = self.ops[index]
        return x if isinstance(op, nn.Identity) else op(x=x, **kwargs)

    def forward(self, x, att_mask=None, pos_emb=None, pad_mask=None, cache_last_channel=None, cache_last_time=None):
        if cache_last_channel is not None or cache_last_time is not None:
            raise NotImplementedError("the DARTS supernet does not stream")
        kwargs = {"att_mask": att_mask, "pos_emb": pos_emb, "pad_mask": pad_mask}
        if self.derived:
            return self._run(int(self.alpha.argmax()), x, **kwargs)
        weights = torch.softmax(self.alpha, dim=0)
        return sum(weights[index] * self._run(index, x, **kwargs) for index in range(len(self.ops)))


class SupernetEncoder(nemo_modules.ConformerEncoder):
    """NeMo's ConformerEncoder whose every layer is a MixedLayer over `candidates` (block specs, see blocks.py)."""

    def __init__(self, candidates: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        template = self.layers[0]  # NeMo's: width, heads, dropouts, the shared relative-position biases
        specs = [blocks.parse(candidate) for candidate in candidates]
        self.layers = nn.ModuleList(MixedLayer(specs, template) for _ in range(len(self.layers)))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [layer.alpha for layer in self.layers]

    def derive(self) -> list[blocks.Block]:
        return [layer.choice() for layer in self.layers]

    def arch_entropy(self) -> float:
        return sum(layer.entropy() for layer in self.layers) / len(self.layers)

    def set_derived(self, derived: bool) -> None:
        for layer in self.layers:
            layer.derived = derived


def register() -> None:
    """Allow NeMo's config instantiation to build SupernetEncoder (idempotent)."""
    if TARGET_PREFIX not in common.ALLOWED_TARGET_PREFIXES:
        common.ALLOWED_TARGET_PREFIXES.append(TARGET_PREFIX)


def split_parameters(model: nn.Module, encoder: SupernetEncoder) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The model's weights and the encoder's architecture parameters, disjoint."""
    arch = encoder.arch_parameters()
    ids = {id(alpha) for alpha in arch}
    return [parameter for parameter in model.parameters() if id(parameter) not in ids], arch


def split_manifest(manifest: Path, data: Path, share: float, workdir: Path) -> tuple[Path, Path, int, int]:
    """Write the weight and architecture manifests (absolute audio paths); return them and their utterance counts."""
    lines = []
    for line in manifest.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            entry["audio_filepath"] = str((data / entry["audio_filepath"]).resolve())
            lines.append(json.dumps(entry))
    weights, arch = darts.split(lines, share)
    paths = workdir / "darts_weights_manifest.json", workdir / "darts_arch_manifest.json"
    for path, part in zip(paths, (weights, arch)):
        path.write_text("\n".join(part) + "\n", encoding="utf-8")
    return paths[0], paths[1], len(weights), len(arch)


def usage_error(message: str) -> int:
    print(f"speechtune-trainer {darts.COMMAND}: error: {message}", file=sys.stderr)
    return 2


def forever(loader) -> Iterator:
    while True:
        yield from loader


def search(args: argparse.Namespace) -> int:
    """Run the search (or resume it from --checkpoint-dir); print the protocol lines; return the exit code."""
    threads = args.threads or cpu_budget()
    torch.set_num_threads(threads)
    from lightning.pytorch import seed_everything
    from omegaconf import OmegaConf

    from nemo.collections.asr.models import EncDecCTCModel
    from nemo.core.optim.lr_scheduler import prepare_lr_scheduler
    from nemo.utils import logging as nemo_logging
    from speechtune_trainer import schedules
    from speechtune_trainer.reporting import ErrorCounter

    nemo_logging.setLevel(nemo_logging.WARNING)
    schedules.register()
    register()
    accelerator = args.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu" and not torch.cuda.is_available():
        return usage_error("--accelerator gpu, but torch sees no CUDA device")
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    bf16 = args.precision == "bf16-mixed" or (args.precision == "auto" and accelerator == "gpu")
    seed_everything(args.seed, workers=True, verbose=False)
    candidates = [str(block) for block in blocks.parse_list(args.candidates)]

    with tempfile.TemporaryDirectory(prefix="speechtune-darts-") as scratch:
        workdir = args.checkpoint_dir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        manifest, _ = training_manifest(args.data, args.train_hours, workdir)
        weights_manifest, arch_manifest, n_weights, n_arch = split_manifest(manifest, args.data, args.arch_split, workdir)
        if not (n_weights and n_arch):
            return usage_error(
                f"--arch-split {args.arch_split} of {n_weights + n_arch} train utterances leaves "
                f"{n_weights} for the weights and {n_arch} for the architecture; each needs at least one"
            )
        max_steps = config.schedule_steps(args, n_weights)
        num_workers = 0 if accelerator == "cpu" else min(8, threads)
        cfg = config.model_config(args, weights_manifest, args.data / "dev_manifest.json", max_steps, num_workers)
        cfg["encoder"] = {**cfg["encoder"], "_target_": f"{TARGET_PREFIX}SupernetEncoder", "candidates": candidates}
        cfg = OmegaConf.create(cfg)
        model = EncDecCTCModel(cfg=cfg, trainer=None).to(device)
        encoder: SupernetEncoder = model.encoder
        # NeMo built the weight split's and the dev set's loaders from train_ds and validation_ds; the held-out
        # split's is train_ds's on the other manifest.
        arch_loader = model._setup_dataloader_from_config(config=OmegaConf.merge(cfg.train_ds, {"manifest_filepath": str(arch_manifest)}))
        loaders = {"weights": model._train_dl, "arch": arch_loader, "dev": model._validation_dl}
        weights, alphas = split_parameters(model, encoder)
        weight_optimizer = torch.optim.AdamW(
            weights, lr=config.lr_for_optimizer(args), betas=(0.9, 0.98), weight_decay=args.weight_decay
        )
        arch_optimizer = torch.optim.Adam(alphas, lr=args.arch_lr, betas=(0.5, 0.999), weight_decay=args.arch_weight_decay)
        scheduler = prepare_lr_scheduler(weight_optimizer, config.schedule_config(args, max_steps))["scheduler"]
        counter = ErrorCounter(model.wer)

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

        def ctc_loss(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
            signal, signal_length, transcript, transcript_length = (tensor.to(device) for tensor in batch)
            with autocast():
                log_probs, encoded_length, _ = model.forward(input_signal=signal, input_signal_length=signal_length)
                loss = model.loss(
                    log_probs=log_probs, targets=transcript, input_lengths=encoded_length, target_lengths=transcript_length
                )
            return loss, log_probs, encoded_length, (transcript, transcript_length)

        checkpoint = workdir / CHECKPOINT if args.checkpoint_dir else None
        first_epoch, last = 1, None
        if checkpoint is not None and checkpoint.exists():
            state = torch.load(checkpoint, map_location=device, weights_only=False)
            model.load_state_dict(state["model"])
            weight_optimizer.load_state_dict(state["weight_optimizer"])
            arch_optimizer.load_state_dict(state["arch_optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            first_epoch, last = state["epoch"] + 1, state["last"]
            print(f"nas-darts: resuming after epoch {state['epoch']} from {checkpoint}", file=sys.stderr)

        arch_batches = forever(loaders["arch"])
        for epoch in range(first_epoch, args.epochs + 1):
            started = time.monotonic()
            model.train()
            encoder.set_derived(False)
            for batch in loaders["weights"]:
                if stop_requested():
                    raise RunStopped
                # Architecture step: held-out loss, gradient at the current weights (first order).
                arch_optimizer.zero_grad(set_to_none=True)
                ctc_loss(next(arch_batches))[0].backward()
                arch_optimizer.step()
                # Weight step: train loss; the alphas' gradients from it are discarded by the next zero_grad.
                weight_optimizer.zero_grad(set_to_none=True)
                ctc_loss(batch)[0].backward()
                weight_optimizer.step()
                if args.schedule != "plateau":
                    scheduler.step()

            model.eval()
            encoder.set_derived(True)
            counter.reset()
            losses = []
            with torch.no_grad():
                for batch in loaders["dev"]:
                    if stop_requested():
                        raise RunStopped
                    loss, log_probs, encoded_length, (transcript, transcript_length) = ctc_loss(batch)
                    losses.append(float(loss))
                    model.wer.update(
                        predictions=log_probs.float(), targets=transcript, targets_lengths=transcript_length,
                        predictions_lengths=encoded_length,
                    )
            wer = float(model.wer.compute()[0])
            model.wer.reset()
            val_loss = sum(losses) / len(losses)
            if args.schedule == "plateau":
                scheduler.step(val_loss)
            derived = encoder.derive()
            last = {
                "wer": wer,
                "cer": counter.cer,
                "val_loss": val_loss,
                "arch_entropy": round(encoder.arch_entropy(), 6),
                "epoch_seconds": round(time.monotonic() - started, 3),
                "derived": blocks.format_list(derived),
            }
            report(step=epoch, **{name: value for name, value in last.items() if name != "derived"})
            print(f"nas-darts epoch {epoch}: derived {last['derived']}; " + describe(encoder), file=sys.stderr)
            if checkpoint is not None:
                state = {
                    "epoch": epoch,
                    "last": last,
                    "model": model.state_dict(),
                    "weight_optimizer": weight_optimizer.state_dict(),
                    "arch_optimizer": arch_optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                }
                partial = checkpoint.with_name(f"{checkpoint.name}.{os.getpid()}")
                torch.save(state, partial)
                os.replace(partial, checkpoint)
    if last is None:
        print("speechtune-trainer nas-darts: error: stopped before the first epoch was validated", file=sys.stderr)
        return 1
    derived = [blocks.parse(block) for block in last["derived"].split(",")]
    report(final=True, wer=last["wer"], cer=last["cer"], params=darts.final_params(derived))
    return 0


def describe(encoder: SupernetEncoder) -> str:
    """Each layer's top three candidates with their softmax weights, for the log."""
    parts = []
    for index, layer in enumerate(encoder.layers):
        probabilities = torch.softmax(layer.alpha.detach().float(), dim=0).tolist()
        ranked = sorted(zip(probabilities, map(str, layer.candidates)), reverse=True)[:3]
        parts.append(f"layer {index}: " + ", ".join(f"{name} {p:.3f}" for p, name in ranked))
    return "; ".join(parts)
