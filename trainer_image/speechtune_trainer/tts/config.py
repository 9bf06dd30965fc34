"""The `tts-acoustic` and `tts-vocoder` flags, their checks, and the NeMo configs they build.

Plain Python (no torch, no NeMo), like the `asr` flags in ../config.py: a bad trial fails in
milliseconds and exits 2 naming the flag. The audio analysis (sample rate, STFT, mels, pitch
range and statistics) belongs to the corpus: `make-data --tts` writes it to DATA/tts.json, and
both models take it from there, so an acoustic model and a vocoder trained on one corpus fit.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from speechtune_trainer import config as asr_config

TTS_FILE = "tts.json"
CHECKPOINT_SUFFIXES = (".ckpt", ".nemo")
OBJECTIVES = ("mcd", "f0_rmse", "asr_cer")


def add_common_arguments(parser: argparse.ArgumentParser, lr: float, batch_size: int) -> None:
    """The flags both TTS commands share: data, optimisation, run, objectives."""
    parser.add_argument("--data", type=Path, required=True, help="directory written by `make-data --tts`")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=lr, help="peak learning rate (docs/trainer.md, per schedule)")
    opt.add_argument("--schedule", choices=asr_config.SCHEDULES, default="warmup-cosine")
    opt.add_argument("--warmup-steps", type=int, default=10, help="ignored by plateau")
    opt.add_argument("--weight-decay", type=float, default=1e-6)
    opt.add_argument("--batch-size", type=int, default=batch_size)
    opt.add_argument("--epochs", type=int, default=10)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--train-hours", type=float, default=None, help="train on the first H hours of train_manifest.json")
    run = parser.add_argument_group("run")
    run.add_argument("--checkpoint-dir", type=Path, default=None, help="save every epoch; resume from here if a checkpoint exists")
    run.add_argument("--init-from", type=Path, default=None, help="start from this .ckpt or .nemo model's weights (same architecture)")
    run.add_argument("--artifacts-dir", type=Path, default=None, help="synthesised WAVs and a mel PNG (default CHECKPOINT_DIR/artifacts)")
    run.add_argument("--accelerator", choices=("auto", "cpu", "gpu"), default="auto")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the CPUs this process may use)")
    judge = parser.add_argument_group("objectives")
    judge.add_argument("--asr-checkpoint", type=Path, default=None, help="a frozen `asr` model (.ckpt or .nemo): adds asr_cer")
    judge.add_argument("--eval-utterances", type=int, default=8, help="dev utterances synthesised and scored per validation")
    judge.add_argument("--artifact-utterances", type=int, default=3, help="synthesised WAVs written per validation")


def add_acoustic_arguments(parser: argparse.ArgumentParser) -> None:
    """FastPitch (learned alignment, characters): `speechtune-trainer tts-acoustic`."""
    add_common_arguments(parser, lr=1e-3, batch_size=16)
    arch = parser.add_argument_group("architecture")
    arch.add_argument("--encoder-layers", type=int, default=2)
    arch.add_argument("--decoder-layers", type=int, default=2)
    arch.add_argument("--heads", type=int, default=2, help="attention heads of both; d_head = d_model / heads")
    arch.add_argument("--d-model", type=int, default=64, help="symbol embedding and transformer width")
    arch.add_argument("--ff-size", type=int, default=None, help="the transformers' convolutional feed-forward width (default 4 x d_model)")
    arch.add_argument("--dropout", type=float, default=0.1)
    arch.add_argument("--duration-predictor-filters", type=int, default=64)
    arch.add_argument("--duration-predictor-layers", type=int, default=2)
    arch.add_argument("--pitch-predictor-filters", type=int, default=64)
    arch.add_argument("--pitch-predictor-layers", type=int, default=2)
    judge = parser.add_argument_group("objectives")
    judge.add_argument(
        "--vocoder-checkpoint", type=Path, default=None,
        help="a frozen tts-vocoder model (.ckpt or .nemo) for the objectives (default: Griffin-Lim)",
    )
    judge.add_argument("--griffin-lim-iters", type=int, default=32)


def add_vocoder_arguments(parser: argparse.ArgumentParser) -> None:
    """HiFi-GAN: `speechtune-trainer tts-vocoder`."""
    add_common_arguments(parser, lr=2e-4, batch_size=8)
    arch = parser.add_argument_group("architecture")
    arch.add_argument("--upsample-rates", default="8,8,4", help="comma-separated; their product must be the corpus's hop length")
    arch.add_argument("--initial-channels", type=int, default=128, help="the generator's upsample_initial_channel")
    arch.add_argument("--discriminator-periods", default="2,3,5,7,11", help="comma-separated periods of the multi-period discriminator")
    arch.add_argument("--l1-loss-factor", type=float, default=45.0, help="weight of the mel L1 loss in the generator loss")
    arch.add_argument("--segment-size", type=int, default=8192, help="audio samples per training segment; a multiple of the hop length")
    arch.add_argument(
        "--acoustic-checkpoint", type=Path, default=None,
        help="a frozen tts-acoustic model (.ckpt or .nemo): train on its mels (default: ground-truth mels)",
    )


def integers(text: str) -> list[int]:
    """`"8,8,4"` -> [8, 8, 4]; ValueError when a part is not an integer."""
    return [int(part) for part in text.split(",") if part.strip()]


def corpus(data: Path) -> dict:
    """DATA/tts.json: the corpus's audio analysis and pitch statistics."""
    return json.loads((data / TTS_FILE).read_text(encoding="utf-8"))


def checkpoint_problem(flag: str, path: Path | None) -> str | None:
    if path is None:
        return None
    if not path.is_file():
        return f"{flag} {path}: no such file"
    if path.suffix not in CHECKPOINT_SUFFIXES:
        return f"{flag} {path}: expected a Lightning .ckpt or a NeMo .nemo file"
    return None


def common_problems(args: argparse.Namespace, positive: tuple[str, ...]) -> list[str]:
    found = []
    for flag in ("batch_size", "epochs", "eval_utterances", *positive):
        if getattr(args, flag) < 1:
            found.append(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not args.lr > 0:
        found.append(f"--lr must be positive, got {args.lr}")
    for flag in ("warmup_steps", "weight_decay", "artifact_utterances"):
        if getattr(args, flag) < 0:
            found.append(f"--{flag.replace('_', '-')} must not be negative, got {getattr(args, flag)}")
    if args.schedule == "noam" and args.warmup_steps == 0:
        found.append("--schedule noam needs --warmup-steps >= 1 (its peak is at the end of warmup)")
    if args.train_hours is not None and not args.train_hours > 0:
        found.append(f"--train-hours must be positive, got {args.train_hours}")
    for flag in ("init_from", "asr_checkpoint"):
        problem = checkpoint_problem(f"--{flag.replace('_', '-')}", getattr(args, flag))
        if problem:
            found.append(problem)
    missing = [name for name in ("train_manifest.json", "dev_manifest.json", TTS_FILE) if not (args.data / name).is_file()]
    if missing:
        found.append(f"--data {args.data} lacks {', '.join(missing)}; create it with `speechtune-trainer make-data --tts`")
    return found


def acoustic_problems(args: argparse.Namespace) -> list[str]:
    """Every invalid tts-acoustic flag, each naming its flags. Empty when the run can start."""
    found = common_problems(
        args,
        ("encoder_layers", "decoder_layers", "heads", "d_model", "duration_predictor_filters", "duration_predictor_layers",
         "pitch_predictor_filters", "pitch_predictor_layers", "griffin_lim_iters"),
    )
    if args.ff_size is not None and args.ff_size < 1:
        found.append(f"--ff-size must be at least 1, got {args.ff_size}")
    if not 0 <= args.dropout < 1:
        found.append(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.heads >= 1 and args.d_model % args.heads:
        found.append(f"--d-model ({args.d_model}) is not divisible by --heads ({args.heads})")
    problem = checkpoint_problem("--vocoder-checkpoint", args.vocoder_checkpoint)
    if problem:
        found.append(problem)
    return found


def vocoder_problems(args: argparse.Namespace) -> list[str]:
    """Every invalid tts-vocoder flag, each naming its flags. Empty when the run can start."""
    found = common_problems(args, ("initial_channels", "segment_size"))
    if args.schedule == "plateau":  # HiFi-GAN steps its two schedulers itself, without a metric
        found.append("--schedule plateau is not available for tts-vocoder; use noam, warmup-cosine or warmup-exponential")
    if not args.l1_loss_factor >= 0:
        found.append(f"--l1-loss-factor must not be negative, got {args.l1_loss_factor}")
    lists = {}
    for flag in ("upsample_rates", "discriminator_periods"):
        try:
            lists[flag] = integers(getattr(args, flag))
        except ValueError:
            found.append(f"--{flag.replace('_', '-')} must be comma-separated integers, got {getattr(args, flag)!r}")
            continue
        if not lists[flag] or min(lists[flag]) < 1:
            found.append(f"--{flag.replace('_', '-')} must list positive integers, got {getattr(args, flag)!r}")
            lists.pop(flag)
    rates = lists.get("upsample_rates")
    if rates and args.initial_channels >= 1 and args.initial_channels % 2 ** len(rates):
        found.append(
            f"--initial-channels ({args.initial_channels}) must be divisible by 2^{len(rates)}: each of the "
            f"{len(rates)} --upsample-rates halves the channels"
        )
    problem = checkpoint_problem("--acoustic-checkpoint", args.acoustic_checkpoint)
    if problem:
        found.append(problem)
    if (args.data / TTS_FILE).is_file() and rates:
        hop = corpus(args.data)["hop_length"]
        if math.prod(rates) != hop:
            found.append(
                f"--upsample-rates {args.upsample_rates} multiply to {math.prod(rates)}, not the corpus's hop length "
                f"{hop} (--data {args.data}): the generator must turn one mel frame into {hop} samples"
            )
        if args.segment_size >= 1 and args.segment_size % hop:
            found.append(f"--segment-size ({args.segment_size}) must be a multiple of the corpus's hop length {hop}")
    return found


def tts_dataset(stats: dict, manifest: Path, sup_data: Path) -> dict:
    """NeMo's TTSDataset over one manifest, reading the pitch make-data computed (sup_data/pitch)."""
    return {
        "_target_": "nemo.collections.tts.data.dataset.TTSDataset",
        "manifest_filepath": str(manifest),
        "sample_rate": stats["sample_rate"],
        "sup_data_path": str(sup_data),
        "sup_data_types": ["align_prior_matrix", "pitch"],
        "n_fft": stats["n_fft"],
        "win_length": stats["win_length"],
        "hop_length": stats["hop_length"],
        "window": "hann",
        "n_mels": stats["n_mels"],
        "lowfreq": stats["lowfreq"],
        "highfreq": stats["highfreq"],
        "trim": False,
        "pitch_fmin": stats["pitch_fmin"],
        "pitch_fmax": stats["pitch_fmax"],
        "pitch_norm": True,
        "pitch_mean": stats["pitch_mean"],
        "pitch_std": stats["pitch_std"],
        "use_beta_binomial_interpolator": True,
    }


def _loader(batch_size: int, num_workers: int, shuffle: bool) -> dict:
    return {"drop_last": False, "shuffle": shuffle, "batch_size": batch_size, "num_workers": num_workers, "pin_memory": num_workers > 0}


def _fft(args: argparse.Namespace, layers: int, **extra) -> dict:
    return {
        "n_layer": layers,
        "n_head": args.heads,
        "d_model": args.d_model,
        "d_head": args.d_model // args.heads,
        "d_inner": args.ff_size or 4 * args.d_model,
        "kernel_size": 3,
        "dropout": args.dropout,
        "dropatt": args.dropout,
        "dropemb": 0.0,
        **extra,
    }


def _predictor(args: argparse.Namespace, filters: int, layers: int) -> dict:
    return {
        "_target_": "nemo.collections.tts.modules.fastpitch.TemporalPredictor",
        "input_size": args.d_model,
        "kernel_size": 3,
        "filter_size": filters,
        "dropout": args.dropout,
        "n_layers": layers,
    }


def optim_config(args: argparse.Namespace, max_steps: int, width: int, **optimizer) -> dict:
    """`optim` with the asr schedules (../config.py): `--lr` is the peak of every schedule."""
    shaped = argparse.Namespace(**{**vars(args), "d_model": width})
    return {
        **optimizer,
        "lr": asr_config.lr_for_optimizer(shaped),
        "weight_decay": args.weight_decay,
        "sched": asr_config.schedule_config(shaped, max_steps),
    }


def acoustic_config(args: argparse.Namespace, stats: dict, manifests: dict[str, Path], max_steps: int, num_workers: int) -> dict:
    """NeMo's FastPitch `model:` config: learned alignment, a character tokenizer (nothing to download)."""
    sup_data = args.data / "sup_data"
    chars = "".join(label for label in stats["labels"] if label != " ")
    split = {
        name: {"dataset": tts_dataset(stats, manifests[name], sup_data), "dataloader_params": _loader(args.batch_size, num_workers, name == "train")}
        for name in ("train", "dev")
    }
    return {
        "learn_alignment": True,
        "bin_loss_warmup_epochs": 100,
        "n_speakers": 1,
        "max_token_duration": 75,
        "symbols_embedding_dim": args.d_model,
        "pitch_embedding_kernel_size": 3,
        "sample_rate": stats["sample_rate"],
        "n_mel_channels": stats["n_mels"],
        "text_tokenizer": {
            "_target_": "nemo.collections.common.tokenizers.text_to_speech.tts_tokenizers.BaseCharsTokenizer",
            "chars": chars,
            "punct": False,
            "apostrophe": False,
            "pad_with_space": True,
        },
        "train_ds": split["train"],
        "validation_ds": split["dev"],
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            **_filterbank(stats),
            "features": stats["n_mels"],
            "window_size": False,
            "window_stride": False,
            "pad_to": 1,
            "pad_value": 0,
            "log_zero_guard_type": "add",
        },
        "input_fft": {
            "_target_": "nemo.collections.tts.modules.transformer.FFTransformerEncoder",
            **_fft(args, args.encoder_layers, d_embed=args.d_model),
        },
        "output_fft": {"_target_": "nemo.collections.tts.modules.transformer.FFTransformerDecoder", **_fft(args, args.decoder_layers)},
        "alignment_module": {
            "_target_": "nemo.collections.tts.modules.aligner.AlignmentEncoder",
            "n_text_channels": args.d_model,
            "n_mel_channels": stats["n_mels"],
        },
        "duration_predictor": _predictor(args, args.duration_predictor_filters, args.duration_predictor_layers),
        "pitch_predictor": _predictor(args, args.pitch_predictor_filters, args.pitch_predictor_layers),
        "optim": optim_config(args, max_steps, args.d_model, name="adamw", betas=[0.9, 0.999]),
    }


def _filterbank(stats: dict) -> dict:
    """The mel analysis both models' NeMo filterbanks share: the corpus's STFT and mels, natural-log magnitudes."""
    return {
        "lowfreq": stats["lowfreq"],
        "highfreq": stats["highfreq"],
        "n_fft": stats["n_fft"],
        "n_window_size": stats["win_length"],
        "n_window_stride": stats["hop_length"],
        "sample_rate": stats["sample_rate"],
        "window": "hann",
        "normalize": None,
        "preemph": None,
        "dither": 0.0,
        "frame_splicing": 1,
        "log": True,
        "log_zero_guard_value": 1e-05,
        "mag_power": 1.0,
    }


def mel_features(stats: dict) -> dict:
    """NeMo's FilterbankFeatures as HiFi-GAN's recipe sets them (exact padding: frames x hop = samples)."""
    return {
        "_target_": "nemo.collections.asr.parts.preprocessing.features.FilterbankFeatures",
        **_filterbank(stats),
        "nfilt": stats["n_mels"],
        "pad_to": 0,
        "pad_value": -11.52,
        "log_zero_guard_type": "clamp",
        "use_grads": False,
        "exact_pad": True,
    }


def vocoder_config(
    args: argparse.Namespace, stats: dict, manifests: dict[str, Path], max_steps: int, num_workers: int, precomputed: bool
) -> dict:
    """NeMo's HiFi-GAN `model:` config; `precomputed`: the manifests carry the frozen acoustic model's mels."""
    rates = integers(args.upsample_rates)

    def dataset(manifest: Path) -> dict:
        return {
            "_target_": "nemo.collections.tts.data.dataset.VocoderDataset",
            "manifest_filepath": str(manifest),
            "sample_rate": stats["sample_rate"],
            "n_segments": args.segment_size,
            "load_precomputed_mel": precomputed,
            "hop_length": stats["hop_length"],
        }

    return {
        "sample_rate": stats["sample_rate"],
        "discriminator_periods": integers(args.discriminator_periods),  # read by vocoder.HifiGan
        "l1_loss_factor": args.l1_loss_factor,
        "max_steps": max_steps,
        "preprocessor": mel_features(stats),
        "generator": {
            "_target_": "nemo.collections.tts.modules.hifigan_modules.Generator",
            "resblock": 1,
            "upsample_rates": rates,
            "upsample_kernel_sizes": [2 * rate for rate in rates],
            "upsample_initial_channel": args.initial_channels,
            "resblock_kernel_sizes": [3, 7, 11],
            "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
            "initial_input_size": stats["n_mels"],
        },
        "train_ds": {"dataset": dataset(manifests["train"]), "dataloader_params": _loader(args.batch_size, num_workers, True)},
        "validation_ds": {"dataset": dataset(manifests["dev"]), "dataloader_params": _loader(args.batch_size, num_workers, False)},
        "optim": optim_config(args, max_steps, args.initial_channels, _target_="torch.optim.AdamW", betas=[0.8, 0.99]),
    }
