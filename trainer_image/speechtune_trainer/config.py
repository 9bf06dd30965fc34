"""The `asr` flags: their definitions, the checks on their combinations, and the NeMo model config they build.

Everything here is plain Python (no torch, no NeMo), so a bad trial fails in milliseconds
instead of after NeMo's import. The config is a dict in NeMo's own schema; train.py hands
it to NeMo's model classes unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from speechtune.protocol import worker_mode
from speechtune_trainer import blocks

ENCODERS = ("conformer", "transformer", "lstm", "gru")
DECODERS = ("ctc", "transducer", "hybrid", "attention")
SKIP_CONNECTIONS = ("none", "residual", "long")  # encoders.connect
RESIDUAL_ENCODERS = ("conformer", "transformer")  # whose blocks have residual branches to scale
SCHEDULES = ("noam", "warmup-cosine", "warmup-exponential", "plateau")
LABELS_FILE = "labels.json"  # make-data's character set, the default vocabulary
INIT_SUFFIXES = (".ckpt", ".nemo")
SUBSAMPLING_FACTOR = 4
DEFAULT_CTC_WEIGHT = 0.3
# --decoder attention (attention.py): its flags' defaults; the decoder is as wide as the encoder (--d-model).
ATTENTION_DEFAULTS = {"decoder_layers": 2, "decoder_heads": 4, "beam_size": 1}
MAX_GENERATION_DELTA = 50  # decoded tokens beyond the encoder's frames, at most (NeMo's AED default)
FINAL_LR_RATIO = 0.01  # cosine and exponential decay to lr * FINAL_LR_RATIO at the last step
DEFAULT_BATCH_SIZE = 16
WORLD_SIZE_ENV = "WORLD_SIZE"  # set by the operator on every pod of an N-pod trial: N (docs/trainer.md)
NODE_RANK_ENV = "NODE_RANK"  # ... and the pod's index


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every `asr` flag. The CLI also accepts each with underscores (`--n_mels=64`)."""
    parser.add_argument("--data", type=Path, required=True, help="directory written by make-data")
    parser.add_argument(
        "--labels", default=None,
        help="the model's characters, e.g. \" abcdefghijklmnopqrstuvwxyz'\" (default: DATA/labels.json, else the transcripts')",
    )
    audio = parser.add_argument_group("audio")
    audio.add_argument("--sample-rate", type=int, default=16000, help="Hz; audio is resampled on load")
    audio.add_argument("--win-length-ms", type=float, default=25.0, help="STFT window; n_fft is the next power of 2")
    audio.add_argument("--hop-length-ms", type=float, default=10.0)
    audio.add_argument("--n-mels", type=int, default=64)
    arch = parser.add_argument_group("architecture")
    arch.add_argument("--encoder", choices=ENCODERS, default="conformer")
    arch.add_argument("--num-layers", type=int, default=2)
    arch.add_argument("--d-model", type=int, default=96, help="encoder width (the RNN output width for lstm/gru)")
    arch.add_argument("--attention-heads", type=int, default=4, help="conformer and transformer only")
    arch.add_argument("--conv-kernel-size", type=int, default=15, help="conformer only; odd")
    arch.add_argument("--dropout", type=float, default=0.1)
    arch.add_argument(
        "--residual-scale", type=float, default=None,
        help="conformer and transformer only: the weight of each block's feed-forward residual branches (NeMo's half step, 0.5)",
    )
    arch.add_argument(
        "--skip-connections", choices=SKIP_CONNECTIONS, default="none",
        help="across the encoder's blocks: residual adds each block's input to its output; long adds the first block's input to the last's output",
    )
    arch.add_argument(
        "--conformer-blocks", default=None,
        help="conformer only: one block per layer, comma-separated, e.g. k15-ff4-att,k7-ff2-noatt,skip "
        "(kernel, feed-forward expansion, self-attention or not; skip drops the layer), instead of --conv-kernel-size; "
        "what nas-darts derives",
    )
    decoder = parser.add_argument_group("decoder")
    decoder.add_argument("--decoder", choices=DECODERS, default="ctc")
    decoder.add_argument(
        "--ctc-weight", type=float, default=None, help=f"hybrid only: the CTC share of the loss (default {DEFAULT_CTC_WEIGHT})"
    )
    decoder.add_argument(
        "--decoder-layers", type=int, default=None,
        help=f"attention only: transformer decoder blocks (default {ATTENTION_DEFAULTS['decoder_layers']})",
    )
    decoder.add_argument(
        "--decoder-heads", type=int, default=None,
        help=f"attention only: heads of each decoder block; must divide --d-model (default {ATTENTION_DEFAULTS['decoder_heads']})",
    )
    decoder.add_argument(
        "--beam-size", type=int, default=None,
        help=f"attention only: 1 decodes greedily, more runs NeMo's beam search (default {ATTENTION_DEFAULTS['beam_size']})",
    )
    aug = parser.add_argument_group("SpecAugment")
    aug.add_argument("--freq-masks", type=int, default=2)
    aug.add_argument("--freq-width", type=int, default=15, help="mel bins per frequency mask, at most")
    aug.add_argument("--time-masks", type=int, default=2)
    aug.add_argument("--time-width", type=float, default=0.05, help="fraction of the utterance per time mask, at most")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, for every schedule (docs/trainer.md)")
    opt.add_argument("--schedule", choices=SCHEDULES, default="warmup-cosine")
    opt.add_argument("--warmup-steps", type=int, default=30, help="ignored by plateau")
    opt.add_argument("--weight-decay", type=float, default=1e-3)
    opt.add_argument(
        "--batch-size", type=int, default=None,
        help=f"utterances per optimiser step in each process (default {DEFAULT_BATCH_SIZE}); the global batch is this x processes",
    )
    opt.add_argument(
        "--global-batch-size", type=int, default=None,
        help="utterances per optimiser step over all processes, split evenly among them; instead of --batch-size",
    )
    opt.add_argument("--epochs", type=int, default=10)
    opt.add_argument(
        "--schedule-epochs", type=int, default=None,
        help="epochs the lr schedule spans (default --epochs): a proxy run on the full run's schedule, which a longer run resumes unchanged",
    )
    opt.add_argument("--seed", type=int, default=0)
    fidelity = parser.add_argument_group("fidelity")
    fidelity.add_argument("--train-hours", type=float, default=None, help="train on the first H hours of train_manifest.json")
    run = parser.add_argument_group("run")
    run.add_argument("--checkpoint-dir", type=Path, default=None, help="save every epoch; resume from here if a checkpoint exists")
    run.add_argument(
        "--init-from", type=Path, default=None,
        help="start from this .ckpt or .nemo model's weights, output rows mapped by character; resuming --checkpoint-dir wins",
    )
    run.add_argument("--accelerator", choices=("auto", "cpu", "gpu"), default="auto")
    run.add_argument(
        "--precision", choices=("auto", "32", "bf16-mixed", "16-mixed"), default="auto", help="auto: bf16-mixed on GPU, 32 on CPU"
    )
    run.add_argument(
        "--devices", type=int, default=None,
        help="processes on this machine, one per device (DDP when devices x nodes > 1; default: the visible GPUs, 1 on CPU)",
    )
    run.add_argument(
        "--num-nodes", type=int, default=None,
        help=f"machines (pods) in the run (default: ${WORLD_SIZE_ENV}, else 1); each also needs MASTER_ADDR, MASTER_PORT, NODE_RANK",
    )
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the CPUs this process may use)")


def n_fft(args: argparse.Namespace) -> int:
    """The smallest power of two that holds one analysis window."""
    return 2 ** math.ceil(math.log2(args.win_length_ms / 1000 * args.sample_rate))


def character_set(texts: Iterable[str]) -> list[str]:
    """The sorted characters of `texts`, with the space that separates words even if no text has two."""
    return sorted(set(" ").union(*texts))


def transcripts(data: Path) -> list[str]:
    """The train and dev transcripts: the texts NeMo turns into label ids."""
    return [
        json.loads(line)["text"]
        for split in ("train", "dev")
        for line in (data / f"{split}_manifest.json").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def labels(args: argparse.Namespace) -> list[str]:
    """The model's characters: --labels, else DATA/labels.json, else the transcripts' characters (older corpora)."""
    if args.labels is not None:
        return list(args.labels)
    path = args.data / LABELS_FILE
    if not path.is_file():
        return character_set(transcripts(args.data))
    found = json.loads(path.read_text(encoding="utf-8"))
    if not (isinstance(found, list) and all(isinstance(label, str) and len(label) == 1 for label in found)):
        raise ValueError(f"{path} is not a JSON list of single characters")
    return found


def label_problems(args: argparse.Namespace) -> list[str]:
    """A label set that is empty, repeats a character, or lacks one the transcripts use (NeMo would silently drop it)."""
    source = "--labels" if args.labels is not None else f"--data {args.data}: {LABELS_FILE}"
    try:
        vocabulary, texts = labels(args), transcripts(args.data)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [f"--data {args.data}: cannot read the labels or transcripts: {error}"]
    if not vocabulary:
        return [f"{source} is empty"]
    found = []
    repeated = sorted({label for label in vocabulary if vocabulary.count(label) > 1})
    if repeated:
        found.append(f"{source} repeats {', '.join(map(repr, repeated))}")
    missing = sorted(set("".join(texts)) - set(vocabulary))
    if missing:
        found.append(f"{source} lacks {', '.join(map(repr, missing))}, used in the train/dev transcripts")
    return found


def problems(args: argparse.Namespace) -> list[str]:
    """Every invalid flag value or combination, each naming its flags. Empty when the run can start."""
    found = []
    counts = ("sample_rate", "n_mels", "num_layers", "d_model", "attention_heads", "epochs")
    for flag in (*counts, "batch_size", "global_batch_size", "devices", "num_nodes"):  # the last four: None by default
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            found.append(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.num_nodes is None and not _positive_int(os.environ.get(WORLD_SIZE_ENV, "1")):
        found.append(
            f"--num-nodes defaults to ${WORLD_SIZE_ENV} (the pods of the trial), "
            f"which is {os.environ[WORLD_SIZE_ENV]!r}, not a positive integer"
        )
    for flag in ("lr", "win_length_ms", "hop_length_ms"):
        if not getattr(args, flag) > 0:
            found.append(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    for flag in ("freq_masks", "time_masks", "freq_width", "warmup_steps", "weight_decay"):
        if getattr(args, flag) < 0:
            found.append(f"--{flag.replace('_', '-')} must not be negative, got {getattr(args, flag)}")
    if found:
        return found  # the checks below assume sane magnitudes

    if args.win_length_ms < args.hop_length_ms:
        found.append(
            f"--win-length-ms ({args.win_length_ms}) is shorter than --hop-length-ms ({args.hop_length_ms}): "
            "frames would skip audio; use a window at least as long as the hop"
        )
    bins = n_fft(args) // 2 + 1
    if args.n_mels > bins:
        found.append(
            f"--n-mels ({args.n_mels}) exceeds the {bins} frequency bins of a {args.win_length_ms} ms window at "
            f"--sample-rate {args.sample_rate} (n_fft {n_fft(args)}); lower --n-mels or lengthen --win-length-ms"
        )
    if args.freq_width > args.n_mels:
        found.append(f"--freq-width ({args.freq_width}) exceeds --n-mels ({args.n_mels})")
    if not 0 <= args.time_width <= 1:
        found.append(f"--time-width is a fraction of the utterance, in [0, 1]; got {args.time_width}")
    if not 0 <= args.dropout < 1:
        found.append(f"--dropout must be in [0, 1), got {args.dropout}")

    if args.encoder in ("conformer", "transformer") and args.d_model % args.attention_heads:
        found.append(
            f"--d-model ({args.d_model}) is not divisible by --attention-heads ({args.attention_heads}) "
            f"for --encoder {args.encoder}"
        )
    if args.encoder == "conformer" and args.conv_kernel_size % 2 == 0:  # NeMo pads it symmetrically
        found.append(f"--conv-kernel-size must be odd for --encoder conformer, got {args.conv_kernel_size}")
    if args.residual_scale is not None:
        if args.encoder not in RESIDUAL_ENCODERS:
            found.append(
                f"--residual-scale only applies to --encoder conformer or transformer (their blocks' feed-forward "
                f"residuals), not --encoder {args.encoder}, whose blocks have none; see --skip-connections"
            )
        elif not 0 < args.residual_scale < math.inf:
            found.append(f"--residual-scale must be positive and finite, got {args.residual_scale}")
    found.extend(conformer_blocks_problems(args))
    if args.encoder in ("lstm", "gru") and args.d_model % 2:
        found.append(f"--encoder {args.encoder} is bidirectional, so --d-model must be even, got {args.d_model}")

    if args.ctc_weight is not None:
        if args.decoder != "hybrid":
            found.append(f"--ctc-weight only applies to --decoder hybrid, not --decoder {args.decoder}")
        elif not 0 <= args.ctc_weight <= 1:
            found.append(f"--ctc-weight is a share of the loss, in [0, 1]; got {args.ctc_weight}")
    found.extend(attention_problems(args))
    if args.batch_size is not None and args.global_batch_size is not None:
        found.append(
            f"--batch-size ({args.batch_size}, per process) and --global-batch-size ({args.global_batch_size}, "
            "over all processes) both set the batch; give one"
        )
    if args.accelerator == "cpu" and args.precision == "16-mixed":
        found.append("--precision 16-mixed needs a GPU (Lightning has no fp16 autocast on CPU); use bf16-mixed or 32 with --accelerator cpu")
    found.extend(rendezvous_problems(args))
    devices = local_devices_before_torch(args)
    if devices is not None:  # else train() checks the shape once torch has counted the GPUs
        found.extend(shape_problems(args, devices, num_nodes(args)))
    if args.schedule == "noam" and args.warmup_steps == 0:
        found.append("--schedule noam needs --warmup-steps >= 1 (its peak is at the end of warmup)")
    if args.schedule_epochs is not None and args.schedule_epochs < args.epochs:
        found.append(f"--schedule-epochs ({args.schedule_epochs}) is below --epochs ({args.epochs}): the schedule would end before training")
    if args.train_hours is not None and not args.train_hours > 0:
        found.append(f"--train-hours must be positive, got {args.train_hours}")
    if args.init_from is not None:
        if not args.init_from.is_file():
            found.append(f"--init-from {args.init_from}: no such file")
        elif args.init_from.suffix not in INIT_SUFFIXES:
            found.append(f"--init-from {args.init_from}: expected a Lightning .ckpt or a NeMo .nemo file")
    absent = [split for split in ("train", "dev") if not (args.data / f"{split}_manifest.json").is_file()]
    for split in absent:
        found.append(f"--data {args.data} has no {split}_manifest.json; create it with `speechtune-trainer make-data`")
    if not absent:
        found.extend(label_problems(args))
    return found


def attention_problems(args: argparse.Namespace) -> list[str]:
    """--decoder-layers, --decoder-heads, --beam-size: only with --decoder attention, positive, heads dividing --d-model."""
    given = [flag for flag in ATTENTION_DEFAULTS if getattr(args, flag) is not None]
    if args.decoder != "attention":
        return [f"--{flag.replace('_', '-')} only applies to --decoder attention, not --decoder {args.decoder}" for flag in given]
    found = [
        f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}" for flag in given if getattr(args, flag) < 1
    ]
    heads = attention_setting(args, "decoder_heads")
    if not found and args.d_model % heads:
        found.append(f"--d-model ({args.d_model}), the decoder's width, is not divisible by --decoder-heads ({heads})")
    return found


def attention_setting(args: argparse.Namespace, flag: str) -> int:
    """An attention decoder flag's value, else its default."""
    value = getattr(args, flag)
    return ATTENTION_DEFAULTS[flag] if value is None else value


def _positive_int(text: str) -> bool:
    return text.isdigit() and int(text) >= 1


def num_nodes(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    """--num-nodes, else $WORLD_SIZE (set on each pod of an N-pod trial to N), else 1."""
    if args.num_nodes is not None:
        return args.num_nodes
    return int(environ.get(WORLD_SIZE_ENV, "1"))


def rendezvous_problems(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> list[str]:
    """An explicit --num-nodes that contradicts $WORLD_SIZE, or a $NODE_RANK outside the nodes.

    Not in a process Lightning started for another device (LOCAL_RANK set): its WORLD_SIZE counts processes.
    """
    if "LOCAL_RANK" in environ:
        return []
    found = []
    world = environ.get(WORLD_SIZE_ENV)
    if args.num_nodes is not None and world is not None and _positive_int(world) and int(world) != args.num_nodes:
        found.append(f"--num-nodes {args.num_nodes} contradicts ${WORLD_SIZE_ENV}={world}, the pods of the trial; drop one")
    rank = environ.get(NODE_RANK_ENV)
    if rank is not None and not (rank.isdigit() and int(rank) < num_nodes(args, environ)):
        found.append(f"${NODE_RANK_ENV}={rank!r} is not a node index below --num-nodes {num_nodes(args, environ)}")
    return found


def local_devices_before_torch(args: argparse.Namespace, in_process: bool = False) -> int | None:
    """--devices, else its default where torch need not count GPUs: 1 on CPU and for an in-process run (a warm
    worker's); None: the visible GPUs."""
    if args.devices is not None:
        return args.devices
    if args.accelerator == "cpu" or in_process or worker_mode():
        return 1
    return None


def shape_problems(args: argparse.Namespace, devices: int, nodes: int) -> list[str]:
    """What stops a run of `devices` processes on each of `nodes` machines."""
    found = []
    processes = devices * nodes
    if worker_mode() and processes > 1:
        found.append(
            f"--devices {devices} --num-nodes {nodes}: a warm worker is one process and cannot run data-parallel "
            f"over {processes} processes (DDP starts a process per device); run multi-process trials cold "
            "(trialTemplate.workers.mode: cold)"
        )
    if args.global_batch_size is not None and args.global_batch_size % processes:
        found.append(
            f"--global-batch-size ({args.global_batch_size}) is not divisible by the {processes} processes "
            f"(--devices {devices} x --num-nodes {nodes})"
        )
    return found


def batch_size(args: argparse.Namespace, processes: int) -> int:
    """Utterances per optimiser step in each process: --batch-size, else --global-batch-size split evenly."""
    if args.global_batch_size is not None:
        return args.global_batch_size // processes
    return args.batch_size or DEFAULT_BATCH_SIZE


def conformer_blocks_problems(args: argparse.Namespace) -> list[str]:
    """--conformer-blocks: only for the conformer, parseable, one block per --num-layers."""
    if args.conformer_blocks is None:
        return []
    if args.encoder != "conformer":
        return [f"--conformer-blocks only applies to --encoder conformer, not --encoder {args.encoder}"]
    try:
        specs = blocks.parse_list(args.conformer_blocks)
    except ValueError as error:
        return [f"--conformer-blocks {args.conformer_blocks!r}: {error}"]
    if len(specs) != args.num_layers:
        return [
            f"--conformer-blocks gives {len(specs)} blocks but --num-layers is {args.num_layers}; "
            "give one block per layer (skip for a dropped layer)"
        ]
    return []


def connection_config(args: argparse.Namespace) -> dict:
    """The encoder arguments of --residual-scale, --skip-connections and --conformer-blocks; none at their
    defaults (NeMo's own encoder)."""
    options = {}
    if args.conformer_blocks is not None:
        options["blocks"] = [str(block) for block in blocks.parse_list(args.conformer_blocks)]
    if args.residual_scale is not None:
        options["residual_scale"] = args.residual_scale
    if args.skip_connections != "none":
        options["skip_connections"] = args.skip_connections
    return options


def encoder_config(args: argparse.Namespace) -> dict:
    connections = connection_config(args)
    if args.encoder in ("conformer", "transformer"):
        target = {
            # NeMo's, unless a connection option needs ours (the same encoder plus those options).
            "conformer": "speechtune_trainer.encoders.ConformerEncoder" if connections else "nemo.collections.asr.modules.ConformerEncoder",
            "transformer": "speechtune_trainer.encoders.TransformerEncoder",  # the conformer minus convolutions
        }[args.encoder]
        return {
            "_target_": target,
            "feat_in": args.n_mels,
            "n_layers": args.num_layers,
            "d_model": args.d_model,
            "n_heads": args.attention_heads,
            # The transformer drops its convolutions after construction; any odd size builds.
            "conv_kernel_size": args.conv_kernel_size if args.encoder == "conformer" else 3,
            "subsampling": "striding",
            "subsampling_factor": SUBSAMPLING_FACTOR,
            "subsampling_conv_channels": args.d_model,
            "ff_expansion_factor": 4,
            "self_attention_model": "rel_pos",
            "dropout": args.dropout,
            "dropout_pre_encoder": args.dropout,
            "dropout_emb": 0.0,
            "dropout_att": args.dropout,
            **connections,
        }
    if args.encoder == "lstm":
        return {
            "_target_": "speechtune_trainer.encoders.LSTMEncoder" if connections else "nemo.collections.asr.modules.RNNEncoder",
            "feat_in": args.n_mels,
            "n_layers": args.num_layers,
            "d_model": args.d_model,
            "proj_size": args.d_model,
            "rnn_type": "lstm",
            "bidirectional": True,
            "subsampling": "striding",
            "subsampling_factor": SUBSAMPLING_FACTOR,
            "dropout": args.dropout,
            **connections,
        }
    return {
        "_target_": "speechtune_trainer.encoders.GRUEncoder",
        "feat_in": args.n_mels,
        "n_layers": args.num_layers,
        "d_model": args.d_model,
        "dropout": args.dropout,
        **connections,
    }


def schedule_steps(args: argparse.Namespace, utterances: int, processes: int = 1) -> int:
    """The optimiser step where the lr schedule ends: --schedule-epochs (default --epochs) epochs of batches.

    Each of the processes trains on its 1/processes share of the utterances (Lightning's DistributedSampler
    pads the last share), so an epoch has as many steps as one process has batches.
    """
    share = math.ceil(utterances / processes)
    return math.ceil(share / batch_size(args, processes)) * (args.schedule_epochs or args.epochs)


def schedule_config(args: argparse.Namespace, max_steps: int) -> dict:
    """NeMo's `optim.sched` for the schedule; `--lr` is always the peak (see lr_for_optimizer).

    NeMo builds no scheduler at all without `max_steps`, so every schedule carries it
    (NeMo drops it again for schedulers that take no such argument).
    """
    final_lr = args.lr * FINAL_LR_RATIO
    common = {"max_steps": max_steps, "warmup_steps": args.warmup_steps}
    if args.schedule == "noam":
        return {"name": "NoamAnnealing", **common, "d_model": args.d_model, "min_lr": 0.0}
    if args.schedule == "warmup-cosine":
        return {"name": "CosineAnnealing", **common, "min_lr": final_lr}
    if args.schedule == "warmup-exponential":
        return {"name": "WarmupExponentialAnnealing", **common, "min_lr": final_lr}
    return {
        "name": "ReduceLROnPlateau",
        "max_steps": max_steps,
        "monitor": "val_loss",
        "mode": "min",
        "factor": 0.5,
        "patience": 1,
        "min_lr": final_lr,
    }


def lr_for_optimizer(args: argparse.Namespace) -> float:
    """The optimizer's base lr. For noam NeMo multiplies it by d_model^-0.5 * warmup^-0.5 at the peak, so divide that out."""
    if args.schedule == "noam":
        return args.lr * math.sqrt(args.d_model) * math.sqrt(args.warmup_steps)
    return args.lr


def attention_config(args: argparse.Namespace, vocabulary: list[str]) -> dict:
    """The sections NeMo's EncDecTransfModelBPE reads besides the encoder's (attention.AttentionModel builds it)."""
    return {
        "tokenizer": {"labels": vocabulary},  # attention.LabelTokenizer: NeMo's CharTokenizer over the labels
        "transf_encoder": {"num_layers": 0},  # no transformer layers between the encoder and the decoder
        "transf_decoder": {
            "library": "nemo",
            "hidden_size": args.d_model,  # as wide as the encoder's output, so NeMo adds no adapter
            "inner_size": 4 * args.d_model,
            "num_layers": attention_setting(args, "decoder_layers"),
            "num_attention_heads": attention_setting(args, "decoder_heads"),
            "max_sequence_length": 512,
            "embedding_dropout": args.dropout,
            "ffn_dropout": args.dropout,
            "attn_score_dropout": args.dropout,
            "attn_layer_dropout": args.dropout,
            "hidden_act": "relu",
            "pre_ln": True,
            "pre_ln_final_layer_norm": True,
        },
        "head": {"num_layers": 1, "activation": "relu", "log_softmax": True, "dropout": 0.0, "use_transformer_init": True},
        "beam_search": {
            "beam_size": attention_setting(args, "beam_size"),
            "len_pen": 0.0,
            "max_generation_delta": MAX_GENERATION_DELTA,
        },
        "label_smoothing": 0.0,
    }


def model_config(
    args: argparse.Namespace, train_manifest: Path, dev_manifest: Path, max_steps: int, num_workers: int, processes: int = 1
) -> dict:
    """The full NeMo model config (the `model:` section of NeMo's YAML) for these flags, for each of `processes`."""
    vocabulary = labels(args)
    dataset = {
        "labels": vocabulary,
        "sample_rate": args.sample_rate,
        "batch_size": batch_size(args, processes),
        "num_workers": num_workers,
        "pin_memory": num_workers > 0,
        "trim_silence": False,
        # Transcripts are tokenised as written (NeMo's default): no English normalisation to
        # transliterate other languages; problems() checked every character is a label.
        "normalize_transcripts": False,
    }
    cfg: dict = {
        "labels": vocabulary,
        "sample_rate": args.sample_rate,
        "log_prediction": False,
        "train_ds": {**dataset, "manifest_filepath": str(train_manifest), "shuffle": True},
        "validation_ds": {**dataset, "manifest_filepath": str(dev_manifest), "shuffle": False},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": args.sample_rate,
            "normalize": "per_feature",
            "window_size": args.win_length_ms / 1000,
            "window_stride": args.hop_length_ms / 1000,
            "window": "hann",
            "features": args.n_mels,
            "n_fft": n_fft(args),
            "log": True,
            "frame_splicing": 1,
            "dither": 1e-5,
            "pad_to": 0,
        },
        "spec_augment": {
            "_target_": "nemo.collections.asr.modules.SpectrogramAugmentation",
            "freq_masks": args.freq_masks,
            "freq_width": args.freq_width,
            "time_masks": args.time_masks,
            "time_width": args.time_width,
        },
        "encoder": encoder_config(args),
        "optim": {
            "name": "adamw",
            "lr": lr_for_optimizer(args),
            "betas": [0.9, 0.98],
            "weight_decay": args.weight_decay,
            "sched": schedule_config(args, max_steps),
        },
    }
    ctc_decoder = {
        "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
        "feat_in": args.d_model,
        "num_classes": len(vocabulary),
        "vocabulary": vocabulary,
    }
    if args.decoder == "ctc":
        cfg["decoder"] = ctc_decoder
        return cfg
    if args.decoder == "attention":
        cfg.update(attention_config(args, vocabulary))
        return cfg
    # Transducer parts, sized from the encoder width (NeMo reads them from model_defaults).
    cfg["model_defaults"] = {"enc_hidden": args.d_model, "pred_hidden": args.d_model, "joint_hidden": args.d_model}
    cfg["decoder"] = {
        "_target_": "nemo.collections.asr.modules.RNNTDecoder",
        "normalization_mode": None,
        "random_state_sampling": False,
        "blank_as_pad": True,
        "prednet": {"pred_hidden": args.d_model, "pred_rnn_layers": 1, "dropout": args.dropout},
    }
    cfg["joint"] = {
        "_target_": "nemo.collections.asr.modules.RNNTJoint",
        "log_softmax": None,
        "preserve_memory": False,
        "fuse_loss_wer": False,
        "jointnet": {"joint_hidden": args.d_model, "activation": "relu", "dropout": args.dropout},
    }
    cfg["decoding"] = {"strategy": "greedy_batch", "greedy": {"max_symbols": 10}}
    cfg["loss"] = {"loss_name": "default"}
    if args.decoder == "hybrid":
        cfg["aux_ctc"] = {
            "ctc_loss_weight": DEFAULT_CTC_WEIGHT if args.ctc_weight is None else args.ctc_weight,
            "use_cer": False,
            "ctc_reduction": "mean_batch",
            "decoder": ctc_decoder,
            "decoding": {"strategy": "greedy_batch"},
        }
    return cfg
