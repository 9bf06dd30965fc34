"""Frozen models a TTS run loads: the ASR judge, a fixed vocoder, a frozen acoustic model.

Each is built from the config stored in its file (a Lightning `.ckpt`, whose NeMo config is
`hyper_parameters.cfg`, or a `.nemo` archive), its data loaders left unbuilt, and its weights
loaded strictly. A file that is no such model, or one that does not fit this run (another
sample rate, other mels), raises ModelFileError naming the flag and the file.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict


class ModelFileError(Exception):
    """A --*-checkpoint that is missing, unreadable, of the wrong kind, or incompatible with this run."""


def read_model_file(flag: str, path: Path) -> tuple[DictConfig, dict[str, torch.Tensor]]:
    """The NeMo config and state dict in a `.ckpt` or `.nemo` file."""
    try:
        if path.suffix == ".nemo":
            with tarfile.open(path) as archive:  # NeMo writes ./model_config.yaml and ./model_weights.ckpt
                members = {Path(member.name).name: member for member in archive.getmembers()}
                cfg = OmegaConf.create(archive.extractfile(members["model_config.yaml"]).read().decode())
                state = torch.load(io.BytesIO(archive.extractfile(members["model_weights.ckpt"]).read()), map_location="cpu")
            return cfg, state
        # Not weights_only: the hyper-parameters are an OmegaConf config. Load only checkpoints you trust.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        return OmegaConf.create(checkpoint["hyper_parameters"]["cfg"]), checkpoint["state_dict"]
    except Exception as error:  # noqa: BLE001 - any failure to read is the same answer: not a model file
        raise ModelFileError(f"{flag} {path}: not a readable NeMo model checkpoint ({type(error).__name__}: {error})") from error


def build(flag: str, path: Path, model_class, expected: str, **checks):
    """`model_class` from the file's config with its data loaders deferred, weights loaded, in eval mode, frozen.

    `expected` names the kind of model (in the error); `checks` maps a config key to the value
    this run needs (e.g. sample_rate=16000), naming both when they differ.
    """
    cfg, state = read_model_file(flag, path)
    for key, needed in checks.items():
        found = OmegaConf.select(cfg, key)
        if found != needed:
            raise ModelFileError(f"{flag} {path}: its {key} is {found}, but this run's is {needed} (--data)")
    with open_dict(cfg):
        for split in ("train_ds", "validation_ds", "test_ds"):
            if cfg.get(split) is not None:
                cfg[split]["defer_setup"] = True
    try:
        model = model_class(cfg=cfg)
        model.load_state_dict(state, strict=True)
    except Exception as error:  # noqa: BLE001
        raise ModelFileError(f"{flag} {path}: not a {expected} checkpoint ({type(error).__name__}: {str(error)[:300]})") from error
    model.eval()
    model.freeze()
    return model


class Transcriber:
    """A frozen speechtune `asr` model (CTC, transducer or hybrid) that transcribes waveforms greedily."""

    def __init__(self, path: Path) -> None:
        from nemo.collections.asr.models import EncDecCTCModel, EncDecHybridRNNTCTCModel, EncDecRNNTModel
        from speechtune_trainer import encoders

        encoders.register()
        cfg, _ = read_model_file("--asr-checkpoint", path)
        if cfg.get("preprocessor") is None or cfg.get("decoder") is None:
            raise ModelFileError(f"--asr-checkpoint {path}: not an ASR model (its config has no preprocessor and decoder)")
        model_class = EncDecHybridRNNTCTCModel if "aux_ctc" in cfg else EncDecRNNTModel if "joint" in cfg else EncDecCTCModel
        self.model = build("--asr-checkpoint", path, model_class, "speechtune asr")
        self.sample_rate = int(cfg.sample_rate)
        self.ctc = model_class is EncDecCTCModel

    @torch.no_grad()
    def transcribe(self, waveforms: list[np.ndarray], sample_rate: int) -> list[str]:
        import librosa

        texts = []
        for audio in waveforms:
            if sample_rate != self.sample_rate:
                audio = librosa.resample(audio, orig_sr=sample_rate, target_sr=self.sample_rate)
            signal = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None].to(self.model.device)
            length = torch.tensor([signal.shape[1]], device=signal.device)
            if self.ctc:
                log_probs, lengths, _ = self.model(input_signal=signal, input_signal_length=length)
                result = self.model.decoding.ctc_decoder_predictions_tensor(log_probs, decoder_lengths=lengths)
            else:
                encoded, lengths = self.model(input_signal=signal, input_signal_length=length)
                result = self.model.decoding.rnnt_decoder_predictions_tensor(encoder_output=encoded, encoded_lengths=lengths)
            hypothesis = (result[0] if isinstance(result, tuple) else result)[0]
            hypothesis = hypothesis[0] if isinstance(hypothesis, list) else hypothesis
            texts.append(getattr(hypothesis, "text", hypothesis))
        return texts


def load_vocoder(path: Path, stats: dict):
    """A frozen tts-vocoder HiFi-GAN at the corpus's sample rate and mels."""
    from speechtune_trainer.tts.vocoder import HifiGan

    return build(
        "--vocoder-checkpoint", path, HifiGan, "tts-vocoder HiFi-GAN",
        sample_rate=stats["sample_rate"], **{"preprocessor.nfilt": stats["n_mels"]},
    )


def load_acoustic(path: Path, stats: dict):
    """A frozen tts-acoustic FastPitch at the corpus's sample rate and mels."""
    from nemo.collections.tts.models import FastPitchModel

    return build(
        "--acoustic-checkpoint", path, FastPitchModel, "tts-acoustic FastPitch",
        sample_rate=stats["sample_rate"], n_mel_channels=stats["n_mels"],
    )


class GriffinLim:
    """The fixed vocoder without weights: librosa's mel inversion and Griffin-Lim phase."""

    def __init__(self, stats: dict, iterations: int) -> None:
        self.stats = stats
        self.iterations = iterations

    def __call__(self, log_mel: np.ndarray) -> np.ndarray:
        import librosa

        stats = self.stats
        return librosa.feature.inverse.mel_to_audio(
            np.exp(log_mel), sr=stats["sample_rate"], n_fft=stats["n_fft"], hop_length=stats["hop_length"],
            win_length=stats["win_length"], power=1.0, n_iter=self.iterations, fmin=stats["lowfreq"], fmax=stats["highfreq"],
        ).astype(np.float32)


class NeuralVocoder:
    """A frozen HiFi-GAN as a function of one log-mel spectrogram (n_mels x frames)."""

    def __init__(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def __call__(self, log_mel: np.ndarray) -> np.ndarray:
        spec = torch.from_numpy(log_mel)[None].to(self.model.device)
        return self.model.convert_spectrogram_to_audio(spec=spec)[0].float().cpu().numpy()
