"""`make-data --tts`, `tts-acoustic` and `tts-vocoder` on CPU: every flag path trains a step.

One tiny single-speaker corpus and one tiny ASR judge serve every test. The flag paths are
grouped into five in-process runs of one optimiser step each (NeMo's import paid once):

- acoustic A: noam, non-default sizes, --train-hours, --checkpoint-dir, --asr-checkpoint, Griffin-Lim;
- vocoder V: ground-truth mels, warmup-cosine, non-default generator/discriminator, --checkpoint-dir;
- vocoder on A: --acoustic-checkpoint, warmup-exponential, --init-from V, --asr-checkpoint, --artifacts-dir;
- acoustic with V: --vocoder-checkpoint, plateau, --init-from A;
- A resumed: one more epoch from its checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from speechtune_trainer import cli
from tests.speechtune_trainer.test_asr import protocol_lines

pytestmark = pytest.mark.trainer

ONE_STEP = ["--accelerator", "cpu", "--threads", "1", "--epochs", "1", "--batch-size", "4", "--train-hours", "0.001",
            "--eval-utterances", "1", "--artifact-utterances", "1"]
ACOUSTIC = [*ONE_STEP, "--encoder-layers", "1", "--decoder-layers", "1", "--heads", "1", "--d-model", "32", "--ff-size", "64",
            "--duration-predictor-filters", "16", "--duration-predictor-layers", "1", "--pitch-predictor-filters", "16",
            "--pitch-predictor-layers", "1", "--dropout", "0.2", "--griffin-lim-iters", "2"]
VOCODER = [*ONE_STEP, "--upsample-rates", "8,8,4", "--initial-channels", "16", "--segment-size", "2048",
           "--discriminator-periods", "2,3", "--l1-loss-factor", "30"]
OBJECTIVES = ("mcd", "f0_rmse", "val_loss", "epoch_seconds")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tts-data")
    assert cli.main(["make-data", "--tts", "--out", str(out), "--hours", "0.01", "--seed", "3", "--workers", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def asr_checkpoint(corpus, tmp_path_factory) -> Path:
    """A tiny CTC model trained on the TTS corpus itself (3 epochs): a judge, if a poor one."""
    checkpoints = tmp_path_factory.mktemp("asr")
    argv = ["asr", "--data", str(corpus), "--accelerator", "cpu", "--threads", "1", "--num-layers", "1", "--d-model", "64",
            "--n-mels", "40", "--epochs", "3", "--batch-size", "8", "--checkpoint-dir", str(checkpoints)]
    assert cli.main(argv) == 0
    return checkpoints / "last.ckpt"


def run(*argv: str) -> tuple[int, list, str]:
    """Run the command in-process: its exit code, protocol lines and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, protocol_lines(out.getvalue()), err.getvalue()


def trained(*argv: str) -> list:
    code, lines, err = run(*argv)
    assert code == 0, err[-3000:]
    return lines


def one_validated_step(lines, *extra: str) -> dict:
    """The metrics of a run that printed step 1 and the final line, with every objective."""
    assert [(line.step, line.final) for line in lines] == [(1, False), (None, True)]
    metrics = lines[-1].metrics
    for name in (*OBJECTIVES, *extra):
        assert name in metrics and (metrics[name] >= 0 or name == "f0_rmse" and math.isnan(metrics[name])), (name, metrics)
    return metrics


@pytest.fixture(scope="module")
def acoustic(corpus, asr_checkpoint, tmp_path_factory) -> tuple[Path, list]:
    checkpoints = tmp_path_factory.mktemp("acoustic")
    lines = trained("tts-acoustic", "--data", str(corpus), *ACOUSTIC, "--schedule", "noam", "--warmup-steps", "2",
                    "--checkpoint-dir", str(checkpoints), "--asr-checkpoint", str(asr_checkpoint))
    return checkpoints, lines


@pytest.fixture(scope="module")
def vocoder(corpus, tmp_path_factory) -> tuple[Path, list]:
    checkpoints = tmp_path_factory.mktemp("vocoder")
    return checkpoints, trained("tts-vocoder", "--data", str(corpus), *VOCODER, "--checkpoint-dir", str(checkpoints))


def test_make_data_tts_writes_one_voice_pitch_contours_and_statistics(corpus):
    stats = json.loads((corpus / "tts.json").read_text())
    assert stats["voice"] == "en" and stats["sample_rate"] == 16000 and stats["hop_length"] == 256
    assert 60 < stats["pitch_mean"] < 200 and stats["pitch_std"] > 0
    assert stats["pitch_fmin"] <= stats["pitch_min"] <= stats["pitch_max"] <= stats["pitch_fmax"]
    for split in ("train", "dev", "test"):
        entries = [json.loads(line) for line in (corpus / f"{split}_manifest.json").read_text().splitlines()]
        assert entries and all((corpus / "sup_data" / "pitch" / f"{Path(e['audio_filepath']).stem}.pt").is_file() for e in entries)


def test_asr_cer_of_the_reference_audio_is_at_most_that_of_white_noise(corpus, asr_checkpoint):
    import numpy as np
    import soundfile as sf

    from speechtune_trainer.tts.models import Transcriber
    from speechtune_trainer.tts.objectives import character_error_rate

    entries = [json.loads(line) for line in (corpus / "dev_manifest.json").read_text().splitlines()]
    texts = [entry["text"] for entry in entries]
    references = [sf.read(corpus / entry["audio_filepath"], dtype="float32")[0] for entry in entries]
    rng = np.random.default_rng(0)
    noise = [0.1 * rng.standard_normal(len(audio)).astype(np.float32) for audio in references]
    judge = Transcriber(asr_checkpoint)
    reference_cer = character_error_rate(texts, judge.transcribe(references, 16000))
    noise_cer = character_error_rate(texts, judge.transcribe(noise, 16000))
    print(f"ASR CER: reference audio {reference_cer:.3f}, white noise {noise_cer:.3f}")
    assert reference_cer <= noise_cer


def test_acoustic_trains_a_step_and_prints_every_objective_with_artifacts(acoustic):
    checkpoints, lines = acoustic
    one_validated_step(lines, "asr_cer")
    assert (checkpoints / "last.ckpt").is_file()
    artifacts = checkpoints / "artifacts"
    assert (artifacts / "synth-0.wav").stat().st_size > 44 and (artifacts / "mel.png").read_bytes()[:4] == b"\x89PNG"


def test_vocoder_trains_a_step_on_ground_truth_mels(vocoder):
    checkpoints, lines = vocoder
    one_validated_step(lines)
    import torch

    state = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    periods = {name.split(".")[2] for name in state if name.startswith("mpd.discriminators.")}
    assert periods == {"0", "1"}  # --discriminator-periods 2,3


def test_vocoder_trains_on_a_frozen_acoustic_models_mels(corpus, acoustic, vocoder, asr_checkpoint, tmp_path):
    code, lines, err = run(
        "tts-vocoder", "--data", str(corpus), *VOCODER, "--schedule", "warmup-exponential",
        "--acoustic-checkpoint", str(acoustic[0] / "last.ckpt"), "--init-from", str(vocoder[0] / "last.ckpt"),
        "--asr-checkpoint", str(asr_checkpoint), "--artifacts-dir", str(tmp_path / "art"),
    )
    assert code == 0, err[-3000:]
    one_validated_step(lines, "asr_cer")
    assert "tensors copied" in err and (tmp_path / "art" / "synth-0.wav").is_file()


def test_acoustic_with_a_fixed_vocoder_from_another_run(corpus, acoustic, vocoder):
    code, lines, err = run(
        "tts-acoustic", "--data", str(corpus), *ACOUSTIC, "--schedule", "plateau",
        "--vocoder-checkpoint", str(vocoder[0] / "last.ckpt"), "--init-from", str(acoustic[0] / "last.ckpt"),
    )
    assert code == 0, err[-3000:]
    one_validated_step(lines)
    assert f"init-from {acoustic[0] / 'last.ckpt'}: " in err


def test_acoustic_resumes_from_its_checkpoint(corpus, acoustic, asr_checkpoint):
    checkpoints, _ = acoustic
    argv = [*ACOUSTIC, "--schedule", "noam", "--warmup-steps", "2", "--checkpoint-dir", str(checkpoints)]
    lines = trained("tts-acoustic", "--data", str(corpus), *argv, "--epochs", "2")
    assert [(line.step, line.final) for line in lines] == [(2, False), (None, True)]


@pytest.mark.parametrize(
    ("command", "flags", "message"),
    [
        ("tts-acoustic", ["--d-model", "30", "--heads", "4"], "--d-model (30) is not divisible by --heads (4)"),
        ("tts-acoustic", ["--dropout", "1.5", "--encoder-layers", "0"], "--encoder-layers must be at least 1"),
        ("tts-acoustic", ["--vocoder-checkpoint", "nowhere.ckpt"], "--vocoder-checkpoint nowhere.ckpt: no such file"),
        ("tts-vocoder", ["--upsample-rates", "8,8"], "--upsample-rates 8,8 multiply to 64, not the corpus's hop length 256"),
        ("tts-vocoder", ["--upsample-rates", "8,x"], "--upsample-rates must be comma-separated integers"),
        ("tts-vocoder", ["--segment-size", "1000"], "--segment-size (1000) must be a multiple of the corpus's hop length 256"),
        ("tts-vocoder", ["--schedule", "plateau"], "--schedule plateau is not available for tts-vocoder"),
        ("tts-vocoder", ["--acoustic-checkpoint", "fp.txt"], "--acoustic-checkpoint fp.txt: no such file"),
        ("tts-vocoder", ["--asr-checkpoint", "asr.ckpt"], "--asr-checkpoint asr.ckpt: no such file"),
    ],
)
def test_invalid_flags_exit_2_naming_them_before_torch_is_imported(corpus, command, flags, message):
    argv = [command, "--data", str(corpus), *flags]
    script = f"import sys; from speechtune_trainer import cli; code = cli.main({argv!r}); sys.exit(3 if 'torch' in sys.modules else code)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (result.returncode, message in result.stderr) == (2, True), result.stderr


def test_a_corpus_without_tts_json_is_named(tmp_path):
    code, _, err = run("tts-acoustic", "--data", str(tmp_path))
    assert code == 2 and f"--data {tmp_path} lacks train_manifest.json, dev_manifest.json, tts.json" in err


def with_config(source: Path, target: Path, **changes) -> Path:
    """A copy of a checkpoint whose NeMo config has `changes` (say another sample rate)."""
    import torch

    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    for key, value in changes.items():
        checkpoint["hyper_parameters"]["cfg"][key] = value
    torch.save(checkpoint, target)
    return target


def test_checkpoints_that_are_missing_unreadable_or_incompatible_are_named(corpus, acoustic, vocoder, asr_checkpoint, tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    acoustic_ckpt, vocoder_ckpt = acoustic[0] / "last.ckpt", vocoder[0] / "last.ckpt"
    at_22k = with_config(acoustic_ckpt, tmp_path / "fastpitch-22050.ckpt", sample_rate=22050)
    vocoder_22k = with_config(vocoder_ckpt, tmp_path / "hifigan-22050.ckpt", sample_rate=22050)
    cases = [
        (["tts-vocoder", *VOCODER, "--acoustic-checkpoint", str(garbage)], f"--acoustic-checkpoint {garbage}: not a readable"),
        (["tts-vocoder", *VOCODER, "--acoustic-checkpoint", str(asr_checkpoint)], f"--acoustic-checkpoint {asr_checkpoint}: "),
        (["tts-vocoder", *VOCODER, "--acoustic-checkpoint", str(at_22k)],
         f"--acoustic-checkpoint {at_22k}: its sample_rate is 22050, but this run's is 16000"),
        (["tts-acoustic", *ACOUSTIC, "--vocoder-checkpoint", str(vocoder_22k)],
         f"--vocoder-checkpoint {vocoder_22k}: its sample_rate is 22050, but this run's is 16000"),
        (["tts-acoustic", *ACOUSTIC, "--asr-checkpoint", str(garbage)], f"--asr-checkpoint {garbage}: not a readable"),
        (["tts-acoustic", *ACOUSTIC, "--asr-checkpoint", str(vocoder_ckpt)], f"--asr-checkpoint {vocoder_ckpt}: not an ASR model"),
    ]
    for argv, message in cases:
        code, lines, err = run(argv[0], "--data", str(corpus), *argv[1:])
        assert (code, lines) == (2, []) and message in err, (argv, err[-2000:])


def test_a_two_stage_study_hands_the_best_fastpitch_to_every_vocoder_run(corpus, asr_checkpoint, tmp_path):
    """Issue 15's staged study in miniature, through the engine and the real trainers: two FastPitch
    trials, then a HiFi-GAN stage whose runs load the better one; each vocoder log names the model it loaded."""
    import asyncio

    from speechtune import record, spec
    from speechtune.executor import Executor
    from speechtune.local import LocalProcessBackend
    from speechtune.storage import WriteThroughStorage, open_rdb

    trainer = str(Path(sys.executable).parent / "speechtune-trainer")
    shared = ["--data", str(corpus), "--asr-checkpoint", str(asr_checkpoint)]
    manifest = {"metadata": {"name": "tts"}, "spec": {
        "objective": {"metric": "asr_cer", "direction": "minimize"}, "parallelism": 1, "maxFailedTrials": 0,
        "searchSpace": [{"name": "lr", "categorical": [1e-3, 1e-2]}],
        "stages": [
            {"name": "acoustic", "kind": "search", "maxTrials": 2, "sampler": {"type": "grid"}},
            {"name": "vocoder", "kind": "baseline", "trialTemplate": {"command": [trainer, "tts-vocoder"], "args": [*shared, *VOCODER]},
             "handoff": {"from": ["acoustic"], "checkpointFlag": "acoustic_checkpoint"}},
        ],
        "checkpoints": {"keepBest": 1},
        "trialTemplate": {"command": [trainer, "tts-acoustic"], "args": [*shared, *ACOUSTIC]},
        "storage": {"url": f"sqlite:///{tmp_path}/tts.db"}}}
    engine = Executor(spec.parse_study(manifest), WriteThroughStorage(open_rdb(manifest["spec"]["storage"]["url"])),
                      LocalProcessBackend(tmp_path / "logs"), checkpoint_root=tmp_path / "checkpoints")
    outcome = asyncio.run(engine.run())
    assert outcome.state == "Succeeded", outcome.message
    trials = engine.study.trials
    acoustic = min((t for t in trials if record.stage(t) == "acoustic"), key=lambda t: (t.value, t.number))
    handed = record.stages(engine.study.user_attrs)["vocoder"]["handoff"]
    assert handed["trial"] == acoustic.number and handed["checkpoint"] == str(tmp_path / "checkpoints" / f"trial-{acoustic.number}" / "last.ckpt")
    vocoder = next(t for t in trials if record.stage(t) == "vocoder")
    log = (tmp_path / "logs" / f"trial-{vocoder.number}.log").read_text()
    assert f"tts-vocoder: frozen acoustic model {handed['checkpoint']}" in log, log[-2000:]
    assert "asr_cer" in vocoder.user_attrs[record.METRICS]
