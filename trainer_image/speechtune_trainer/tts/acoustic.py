"""`tts-acoustic`: NeMo's FastPitch from flags, scored through a fixed vocoder after every epoch.

FastPitch learns its own alignment (`learn_alignment`, NeMo's AlignmentEncoder) over the
characters of the corpus (BaseCharsTokenizer: no CMUdict, no G2P, nothing downloaded). The
held-out utterances are synthesised from their text alone (predicted durations and pitch) and
turned into audio by Griffin-Lim, or by a frozen tts-vocoder HiFi-GAN (`--vocoder-checkpoint`),
which must share the corpus's sample rate and mels.
"""

from __future__ import annotations

import argparse

from omegaconf import OmegaConf

from speechtune_trainer.tts import config
from speechtune_trainer.tts.models import GriffinLim, NeuralVocoder, load_vocoder
from speechtune_trainer.tts.run import Run, run


def train_acoustic(args: argparse.Namespace) -> int:
    return run("tts-acoustic", args, build)


def build(setting: Run):
    from nemo.collections.tts.models import FastPitchModel

    args, stats = setting.args, setting.stats
    vocoder = (
        NeuralVocoder(load_vocoder(args.vocoder_checkpoint, stats)) if args.vocoder_checkpoint
        else GriffinLim(stats, args.griffin_lim_iters)
    )
    cfg = config.acoustic_config(args, stats, setting.manifests, setting.max_steps, setting.num_workers)
    model = FastPitchModel(cfg=OmegaConf.create(cfg), trainer=setting.trainer)

    def synthesise(model: FastPitchModel, utterances):
        results = []
        for utterance in utterances:
            spec = model.generate_spectrogram(tokens=model.parse(utterance.text, normalize=False))[0].float().cpu().numpy()
            results.append((spec, vocoder(spec)))
        return results

    return model, synthesise

