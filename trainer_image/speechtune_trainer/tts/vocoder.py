"""`tts-vocoder`: NeMo's HiFi-GAN from flags, on ground-truth mels or a frozen acoustic model's.

With `--acoustic-checkpoint` (NVIDIA's fine-tuning order: the vocoder learns the mels the
acoustic model really makes) every train and dev utterance is first run through the frozen
FastPitch teacher-forced (its own alignment of the recording, the recording's pitch), so each
generated mel lines up with its audio; the mels go to WORKDIR/mels/*.npy and HiFi-GAN reads
them (`load_precomputed_mel`). The held-out utterances are then scored end to end: FastPitch
from text alone, then this vocoder. Without it, HiFi-GAN computes the mels of the audio
itself, and the held-out utterances are the copy-synthesis of their reference mels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nemo.collections.tts.models import HifiGanModel
from nemo.collections.tts.modules.hifigan_modules import DiscriminatorP
from omegaconf import OmegaConf

from speechtune_trainer.tts import config
from speechtune_trainer.tts.models import load_acoustic
from speechtune_trainer.tts.run import Run, run


class HifiGan(HifiGanModel):
    """HifiGanModel whose multi-period discriminator has the config's `discriminator_periods` (NeMo's: 2, 3, 5, 7, 11)."""

    def __init__(self, cfg, trainer=None):
        super().__init__(cfg=cfg, trainer=trainer)
        periods = cfg.get("discriminator_periods")
        if periods:
            self.mpd.discriminators = nn.ModuleList([DiscriminatorP(int(period)) for period in periods])


def train_vocoder(args: argparse.Namespace) -> int:
    return run("tts-vocoder", args, build)


@torch.no_grad()
def teacher_forced_mels(acoustic, setting: Run) -> dict[str, Path]:
    """The frozen FastPitch's mel of every train and dev utterance, aligned to its audio; manifests that name them."""
    from nemo.collections.tts.data.dataset import TTSDataset
    from nemo.collections.tts.parts.utils.helpers import process_batch

    folder = setting.workdir / "mels"
    folder.mkdir(exist_ok=True)
    manifests = {}
    for split, manifest in setting.manifests.items():
        options = config.tts_dataset(setting.stats, manifest, setting.args.data / "sup_data")
        options.pop("_target_")
        dataset = TTSDataset(**options, text_tokenizer=acoustic.vocab)
        entries = []
        for index, entry in enumerate(map(json.loads, manifest.read_text().splitlines())):
            batch = process_batch(dataset._collate_fn([dataset[index]]), dataset.sup_data_types_set)
            mels, mel_lens = acoustic.preprocessor(input_signal=batch["audio"], length=batch["audio_lens"])
            generated, *_ = acoustic(
                text=batch["text"], durs=None, pitch=batch["pitch"], speaker=None, pace=1.0, spec=mels,
                attn_prior=batch["align_prior_matrix"], mel_lens=mel_lens, input_lens=batch["text_lens"],
            )
            path = folder / f"{split}-{index:06d}.npy"
            np.save(path, generated[0].float().cpu().numpy())
            entries.append(json.dumps({**entry, "mel_filepath": str(path)}))
        manifests[split] = setting.workdir / f"{split}_mel_manifest.json"
        manifests[split].write_text("\n".join(entries) + "\n")
    return manifests


def build(setting: Run):
    args, stats = setting.args, setting.stats
    acoustic = load_acoustic(args.acoustic_checkpoint, stats) if args.acoustic_checkpoint else None
    if acoustic is not None:  # which model it learned from, in its log: a staged study's handoff can be checked
        print(f"tts-vocoder: frozen acoustic model {args.acoustic_checkpoint}", file=sys.stderr)
    manifests = teacher_forced_mels(acoustic, setting) if acoustic is not None else setting.manifests
    cfg = config.vocoder_config(args, stats, manifests, setting.max_steps, setting.num_workers, precomputed=acoustic is not None)
    model = HifiGan(cfg=OmegaConf.create(cfg), trainer=setting.trainer)

    def mel_of(model: HifiGan, utterance) -> torch.Tensor:
        if acoustic is not None:
            return acoustic.generate_spectrogram(tokens=acoustic.parse(utterance.text, normalize=False))
        audio = torch.from_numpy(utterance.audio)[None].to(model.device)
        return model.audio_to_melspec_precessor(audio, torch.tensor([audio.shape[1]], device=model.device))[0]

    def synthesise(model: HifiGan, utterances):
        results = []
        for utterance in utterances:
            spec = mel_of(model, utterance).to(model.device)
            audio = model.convert_spectrogram_to_audio(spec=spec)[0]
            results.append((spec[0].float().cpu().numpy(), audio.float().cpu().numpy()))
        return results

    return model, synthesise
