"""Flag parsing and validation: fast, no torch or NeMo needed."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from speechtune_trainer import cli, config
from speechtune_trainer.train import training_manifest

PACKAGE = Path(cli.__file__).parent


def parse(*flags: str) -> object:
    return cli.build_parser().parse_args(cli.with_dashes(["asr", "--data", "d", *flags]))


def test_underscore_flags_and_last_value_wins():
    args = parse("--n-mels", "40", "--n_mels=64", "--win_length_ms=20", "--encoder=lstm", "--lr=0.002")
    assert (args.n_mels, args.win_length_ms, args.encoder, args.lr) == (64, 20.0, "lstm", 0.002)


def test_underscores_in_values_are_kept():
    args = cli.build_parser().parse_args(cli.with_dashes(["asr", "--data=my_data", "--checkpoint_dir", "ckpt_dir"]))
    assert (str(args.data), str(args.checkpoint_dir)) == ("my_data", "ckpt_dir")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--d-model", "100", "--attention-heads", "8"], "--d-model (100) is not divisible by --attention-heads (8)"),
        (["--win-length-ms", "10", "--hop-length-ms", "20"], "--win-length-ms (10.0) is shorter than --hop-length-ms"),
        (["--n-mels", "300", "--win-length-ms", "20"], "--n-mels (300) exceeds the 257 frequency bins"),
        (["--decoder", "hybrid", "--ctc-weight", "1.5"], "--ctc-weight is a share of the loss, in [0, 1]"),
        (["--ctc-weight", "0.5"], "--ctc-weight only applies to --decoder hybrid, not --decoder ctc"),
        (["--conv-kernel-size", "8"], "--conv-kernel-size must be odd"),
        (["--encoder", "gru", "--d-model", "33"], "--d-model must be even"),
        (["--schedule", "noam", "--warmup-steps", "0"], "--schedule noam needs --warmup-steps >= 1"),
        (["--n-mels", "40", "--freq-width", "50"], "--freq-width (50) exceeds --n-mels (40)"),
        (["--num-layers", "0"], "--num-layers must be at least 1"),
        (["--time-width", "2"], "--time-width is a fraction"),
        (["--epochs", "5", "--schedule-epochs", "3"], "--schedule-epochs (3) is below --epochs (5)"),
        (["--devices", "0"], "--devices must be at least 1, got 0"),
        (["--num-nodes", "0"], "--num-nodes must be at least 1, got 0"),
        (["--global-batch-size", "0"], "--global-batch-size must be at least 1, got 0"),
        (["--batch-size", "8", "--global-batch-size", "16"], "--batch-size (8, per process) and --global-batch-size (16, over all processes) both"),
        (["--devices", "2", "--num-nodes", "2", "--global-batch-size", "6"], "--global-batch-size (6) is not divisible by the 4 processes (--devices 2 x --num-nodes 2)"),
        (["--accelerator", "cpu", "--global-batch-size", "5", "--num-nodes", "2"], "--global-batch-size (5) is not divisible by the 2 processes (--devices 1 x --num-nodes 2)"),
        (["--accelerator", "cpu", "--precision", "16-mixed"], "--precision 16-mixed needs a GPU"),
        (["--encoder", "lstm", "--residual-scale", "0.5"], "--residual-scale only applies to --encoder conformer or transformer"),
        (["--residual-scale", "0"], "--residual-scale must be positive and finite, got 0.0"),
    ],
)
def test_invalid_combinations_exit_2_naming_the_flags(data_dir, capsys, flags, message):
    assert cli.main(["asr", "--data", str(data_dir), *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("world_size", ["two", "0", "-1", ""])
def test_a_bad_world_size_is_named_as_the_num_nodes_default(data_dir, capsys, monkeypatch, world_size):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    assert cli.main(["asr", "--data", str(data_dir)]) == 2
    assert f"--num-nodes defaults to $WORLD_SIZE (the pods of the trial), which is {world_size!r}" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert config.problems(cli.build_parser().parse_args(["asr", "--data", str(data_dir)])) == []


@pytest.mark.parametrize(
    ("environ", "flags", "message"),
    [
        ({"WORLD_SIZE": "2"}, ["--num-nodes", "3"], "--num-nodes 3 contradicts $WORLD_SIZE=2, the pods of the trial"),
        ({"WORLD_SIZE": "2", "NODE_RANK": "2"}, [], "$NODE_RANK='2' is not a node index below --num-nodes 2"),
        ({"NODE_RANK": "one"}, [], "$NODE_RANK='one' is not a node index below --num-nodes 1"),
    ],
)
def test_rendezvous_variables_that_contradict_the_flags_exit_2(data_dir, capsys, monkeypatch, environ, flags, message):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["asr", "--data", str(data_dir), *flags]) == 2
    assert message in capsys.readouterr().err
    # In a process Lightning started for another device, WORLD_SIZE counts all processes: not checked.
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert config.rendezvous_problems(cli.build_parser().parse_args(["asr", "--data", "d", *flags])) == []


def test_num_nodes_defaults_to_world_size_else_1():
    assert config.num_nodes(parse(), {}) == 1
    assert config.num_nodes(parse(), {"WORLD_SIZE": "3"}) == 3
    assert config.num_nodes(parse("--num-nodes", "2"), {"WORLD_SIZE": "3"}) == 2
    assert config.num_nodes(parse("--num_nodes=4")) == 4


@pytest.mark.parametrize("flags", [["--devices", "2"], ["--accelerator", "cpu", "--num-nodes", "2"]])
def test_a_warm_worker_refuses_more_than_one_process_and_says_why(data_dir, capsys, monkeypatch, flags):
    monkeypatch.setenv("SPEECHTUNE_WORKER", "1")
    assert cli.main(["asr", "--data", str(data_dir), *flags]) == 2
    assert "a warm worker is one process and cannot run data-parallel over 2 processes" in capsys.readouterr().err


def test_a_warm_worker_ignores_the_visible_gpu_count_and_uses_one_device(data_dir, monkeypatch):
    monkeypatch.setenv("SPEECHTUNE_WORKER", "1")
    assert config.local_devices_before_torch(parse()) == 1
    monkeypatch.delenv("SPEECHTUNE_WORKER")
    assert config.local_devices_before_torch(parse()) is None  # a cold run: torch counts the GPUs
    assert config.local_devices_before_torch(parse("--accelerator", "cpu")) == 1
    assert config.local_devices_before_torch(parse(), in_process=True) == 1


def test_an_in_process_run_cannot_start_ddp_processes(data_dir, capsys):
    """Lightning reruns sys.argv for the other processes: an in-process call's sys.argv is not the run's."""
    assert cli.main(["asr", "--data", str(data_dir), "--accelerator", "cpu", "--devices", "2"]) == 2
    assert "run the speechtune-trainer command, not an in-process call" in capsys.readouterr().err


def test_batch_size_is_per_process_and_global_batch_size_is_split():
    assert config.batch_size(parse(), processes=4) == config.DEFAULT_BATCH_SIZE
    assert config.batch_size(parse("--batch-size", "8"), processes=4) == 8
    assert config.batch_size(parse("--global-batch-size", "32"), processes=4) == 8
    # 100 utterances over 2 processes: 50 each, in batches of 8: 7 steps per epoch, as 1 process in batches of 16.
    two = config.schedule_steps(parse("--global-batch-size", "16", "--epochs", "3"), utterances=100, processes=2)
    assert two == config.schedule_steps(parse("--batch-size", "16", "--epochs", "3"), utterances=100) == 7 * 3


def test_valid_flags_have_no_problems(data_dir):
    args = cli.build_parser().parse_args(["asr", "--data", str(data_dir), "--encoder", "transformer", "--conv-kernel-size", "8"])
    assert config.problems(args) == []  # the kernel size is the conformer's only


def test_connection_flags_are_valid_where_they_mean_something(data_dir, capsys):
    for encoder in config.ENCODERS:
        for skip in config.SKIP_CONNECTIONS:
            flags = ["--encoder", encoder, "--skip_connections", skip]
            if encoder in config.RESIDUAL_ENCODERS:
                flags += ["--residual_scale", "1.0"]
            assert config.problems(parse_in(data_dir, *flags)) == [], flags
    with pytest.raises(SystemExit) as exit_:
        cli.main(["asr", "--data", str(data_dir), "--skip-connections", "dense"])
    assert exit_.value.code == 2
    assert "--skip-connections: invalid choice: 'dense'" in capsys.readouterr().err


def parse_in(data: Path, *flags: str) -> object:
    return cli.build_parser().parse_args(cli.with_dashes(["asr", "--data", str(data), *flags]))


def test_missing_manifests_name_data(tmp_path, capsys):
    assert cli.main(["asr", "--data", str(tmp_path)]) == 2
    assert f"--data {tmp_path} has no train_manifest.json" in capsys.readouterr().err


def test_unknown_encoder_is_a_usage_error(data_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["asr", "--data", str(data_dir), "--encoder=cnn"])
    assert exit_.value.code == 2
    assert "--encoder: invalid choice: 'cnn'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--d_model=100", "--attention_heads=8"], "--attention-heads (8)"),
        (["--devices=0"], "--devices must be at least 1"),
        (["--accelerator=cpu", "--devices=2", "--global_batch_size=3"], "--global-batch-size (3) is not divisible"),
        (["--encoder=gru", "--residual_scale=1.0"], "--residual-scale only applies to --encoder conformer or transformer"),
    ],
)
def test_rejection_is_fast_and_imports_no_torch(data_dir, flags, message):
    """The console script rejects bad flags before importing torch or NeMo."""
    assert message in refused_before_torch("asr", data_dir, flags)


def refused_before_torch(command: str, data_dir: Path, flags: list[str]) -> str:
    """The stderr of ``command --data data_dir flags``, in a fresh interpreter, which must exit 2 without
    having imported torch or NeMo."""
    probe = (
        "import sys; from speechtune_trainer.cli import main; "
        f"rc = main([{command!r}, '--data', {str(data_dir)!r}, *{flags!r}]); "
        "assert 'torch' not in sys.modules and 'nemo' not in sys.modules; sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    return done.stderr


def test_noam_lr_is_converted_to_nemos_multiplier():
    args = parse("--schedule", "noam", "--lr", "0.001", "--d-model", "144", "--warmup-steps", "100")
    assert config.lr_for_optimizer(args) == pytest.approx(0.001 * 12 * 10)
    assert config.lr_for_optimizer(parse("--schedule", "warmup-cosine", "--lr", "0.001")) == 0.001


def test_schedule_spans_schedule_epochs_so_a_proxy_run_follows_the_full_runs_lr():
    assert config.schedule_steps(parse("--epochs", "3", "--batch-size", "8"), utterances=100) == 13 * 3
    assert config.schedule_steps(parse("--epochs", "3", "--schedule_epochs=5", "--batch-size", "8"), utterances=100) == 13 * 5


def test_train_hours_takes_a_nested_prefix_with_absolute_paths(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    entries = [{"audio_filepath": f"audio/train/{i}.wav", "duration": 1.0, "text": "one"} for i in range(10)]
    (data / "train_manifest.json").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    short, count_short = training_manifest(data, 3 / 3600, work)
    short_lines = short.read_text().splitlines()
    long, count_long = training_manifest(data, 5 / 3600, work)
    assert (count_short, count_long) == (3, 5)
    assert long.read_text().splitlines()[:3] == short_lines
    assert json.loads(short_lines[0])["audio_filepath"] == str(data.resolve() / "audio/train/0.wav")
    assert training_manifest(data, None, work) == (data / "train_manifest.json", 10)


def test_the_trainer_imports_only_the_protocol_from_speechtune():
    for source in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "speechtune":
                assert node.module == "speechtune.protocol", f"{source.name} imports {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] != "speechtune", f"{source.name} imports {alias.name}"


@pytest.fixture
def spanish(tmp_path: Path) -> Path:
    """Manifests with transcripts but no audio: labels are checked before any audio is read."""
    for split, texts in (("train", ["uno dos", "tres"]), ("dev", ["cero"])):
        lines = [json.dumps({"audio_filepath": f"audio/{split}/{i}.wav", "duration": 1.0, "text": t}) for i, t in enumerate(texts)]
        (tmp_path / f"{split}_manifest.json").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_labels_come_from_labels_json_else_from_the_train_and_dev_transcripts(spanish):
    args = cli.build_parser().parse_args(["asr", "--data", str(spanish)])
    assert config.labels(args) == list(" cdenorstu")  # an older corpus: no labels.json
    (spanish / config.LABELS_FILE).write_text(json.dumps(list(" abcdefghijklmnopqrstuvwxyz")))
    assert config.labels(args) == list(" abcdefghijklmnopqrstuvwxyz")
    cfg = config.model_config(args, spanish / "train_manifest.json", spanish / "dev_manifest.json", 10, 0)
    assert cfg["labels"] == cfg["train_ds"]["labels"] == cfg["decoder"]["vocabulary"] == config.labels(args)
    assert cfg["decoder"]["num_classes"] == 27
    args = cli.build_parser().parse_args(["asr", "--data", str(spanish), "--labels", " abcdeinorstuñ"])
    assert config.labels(args) == list(" abcdeinorstuñ") and config.problems(args) == []


def test_a_label_set_without_a_transcript_character_exits_2_naming_it(spanish, capsys):
    assert cli.main(["asr", "--data", str(spanish), "--labels", " cdenorsu"]) == 2
    assert "--labels lacks 't', used in the train/dev transcripts" in capsys.readouterr().err
    (spanish / config.LABELS_FILE).write_text(json.dumps(list(" cdenorst")))
    assert cli.main(["asr", "--data", str(spanish)]) == 2
    assert f"--data {spanish}: labels.json lacks 'u'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("labels", "message"), [("", "--labels is empty"), (" abcdeinorstuu", "--labels repeats 'u'")]
)
def test_empty_or_repeating_labels_exit_2(spanish, capsys, labels, message):
    assert cli.main(["asr", "--data", str(spanish), "--labels", labels]) == 2
    assert message in capsys.readouterr().err


def test_init_from_a_missing_or_unknown_file_exits_2_naming_it(data_dir, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "last.ckpt"
    assert cli.main(["asr", "--data", str(data_dir), "--init-from", str(missing)]) == 2
    assert f"--init-from {missing}: no such file" in capsys.readouterr().err
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"")
    assert cli.main(["asr", "--data", str(data_dir), "--init_from", str(weights)]) == 2
    assert f"--init-from {weights}: expected a Lightning .ckpt or a NeMo .nemo file" in capsys.readouterr().err
