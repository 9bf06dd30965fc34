"""`--decoder attention`: its flags, a model that decodes what it learnt, beam search, resume and --init-from.

Every encoder with every decoder, attention included, trains a step in test_asr.py's matrix (it runs over
config.ENCODERS x config.DECODERS). Runs are in-process on test_asr.py's tiny digits corpus.
"""

from __future__ import annotations


import pytest
from kaldialign import edit_distance

from speechtune_trainer import cli, config
from tests.speechtune_trainer.test_asr import TINY, protocol_lines, run_in_process
from tests.speechtune_trainer.test_cli import refused_before_torch

pytestmark = pytest.mark.trainer

ONE_STEP = ["--epochs", "1", "--train-hours", "0.004", "--batch-size", "64"]


def test_the_encoder_decoder_matrix_includes_attention():
    assert "attention" in config.DECODERS  # test_asr.test_each_encoder_and_decoder_trains_one_step runs every pair


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--beam-size", "2"], "--beam-size only applies to --decoder attention, not --decoder ctc"),
        (["--decoder", "hybrid", "--decoder_layers=2"], "--decoder-layers only applies to --decoder attention, not --decoder hybrid"),
        (["--decoder", "transducer", "--decoder-heads", "2"], "--decoder-heads only applies to --decoder attention"),
        (["--decoder", "attention", "--decoder-layers", "0"], "--decoder-layers must be at least 1, got 0"),
        (["--decoder", "attention", "--beam-size", "0"], "--beam-size must be at least 1, got 0"),
        (["--decoder", "attention", "--d-model", "96", "--decoder-heads", "5"], "--d-model (96), the decoder's width, is not divisible by --decoder-heads (5)"),
        (["--decoder", "attention", "--ctc-weight", "0.3"], "--ctc-weight only applies to --decoder hybrid, not --decoder attention"),
    ],
)
def test_bad_attention_flags_exit_2_naming_the_flag_before_importing_torch(data_dir, flags, message):
    assert message in refused_before_torch("asr", data_dir, flags)


def test_attention_flags_build_nemos_transformer_decoder_config():
    args = cli.build_parser().parse_args(
        ["asr", "--data", "d", "--decoder", "attention", "--d-model", "32", "--decoder-layers", "3", "--decoder-heads", "2", "--beam-size", "4"]
    )
    section = config.attention_config(args, list(" abc"))
    assert section["transf_decoder"]["hidden_size"] == 32 and section["transf_decoder"]["num_layers"] == 3
    assert section["transf_decoder"]["num_attention_heads"] == 2 and section["beam_search"]["beam_size"] == 4
    defaults = config.attention_config(cli.build_parser().parse_args(["asr", "--data", "d", "--decoder", "attention"]), list(" abc"))
    assert defaults["transf_decoder"]["num_layers"] == config.ATTENTION_DEFAULTS["decoder_layers"]
    assert defaults["beam_search"]["beam_size"] == 1  # greedy


def test_the_tokenizer_is_the_labels_after_three_special_tokens_and_drops_padding_rows():
    from speechtune_trainer.attention import LabelTokenizer

    tokenizer = LabelTokenizer(list(" ab'"))
    assert (tokenizer.pad, tokenizer.bos, tokenizer.eos, tokenizer.vocab_size) == (0, 1, 2, 7)
    assert tokenizer.text_to_ids("ab a'") == [4, 5, 3, 4, 6]
    # 7 is one of the rows NeMo adds to round the classifier up to 8; an untrained model may emit it.
    assert tokenizer.ids_to_text([1, 4, 7, 5, 3, 2, 0]) == "ab "


def test_a_model_that_learnt_four_utterances_decodes_them_greedily_and_by_beam_search(digits):
    """Overfit one batch, then decode it: the text must be the transcripts (an untrained decoder emits nothing or noise)."""
    import torch
    from omegaconf import OmegaConf

    from speechtune_trainer import encoders
    from speechtune_trainer.attention import AttentionModel

    encoders.register()
    args = cli.build_parser().parse_args(
        ["asr", "--data", str(digits), "--num-layers", "1", "--d-model", "64", "--n-mels", "40", "--encoder", "gru",
         "--decoder", "attention", "--decoder-layers", "1", "--beam-size", "3",
         "--dropout", "0", "--freq-masks", "0", "--time-masks", "0", "--batch-size", "4"]
    )
    cfg = config.model_config(args, digits / "train_manifest.json", digits / "dev_manifest.json", max_steps=100, num_workers=0)
    torch.manual_seed(0)
    model = AttentionModel(cfg=OmegaConf.create(cfg))
    signal, signal_len, transcript, transcript_len = batch = next(iter(model._train_dl))
    references = [model.tokenizer.ids_to_text(ids[:length].tolist()) for ids, length in zip(transcript, transcript_len)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the runs' --threads 1: on a busy machine more threads are ten times slower
    try:
        model.train()
        for _ in range(150):  # about 10 s
            loss = model.compute_audio_loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()

    def cer(hypotheses: list[str]) -> float:
        edits = sum(edit_distance(list(r), list(h))["total"] for r, h in zip(references, hypotheses))
        return edits / sum(map(len, references))

    with torch.no_grad():
        beam = model.transcribe_batch(signal, signal_len)
        model.decoding.change_strategy("greedy_batch")
        greedy = model.transcribe_batch(signal, signal_len)
    assert all(references) and len(greedy) == len(beam) == len(references)
    assert cer(greedy) < 0.2, (greedy, references)
    assert cer(beam) < 0.2, (beam, references)
    assert not model.transf_decoder.training  # NeMo's decoding leaves it in training mode; the model puts it back


def test_beam_search_reports_wer_cer_and_val_loss_resumes_and_initialises_attention_only(digits, capsys, tmp_path):
    common = ["--data", str(digits), *TINY, "--encoder", "conformer", "--decoder", "attention", "--decoder-layers", "1"]
    checkpoints = tmp_path / "checkpoints"
    first = run_in_process(capsys, *common, "--beam-size", "2", "--checkpoint-dir", str(checkpoints), *ONE_STEP)
    assert [(line.step, line.final) for line in first] == [(1, False), (None, True)]
    assert {"wer", "cer", "val_loss"} <= set(first[0].metrics)
    assert 0 <= first[0].metrics["cer"] and first[0].metrics["val_loss"] > 0

    resumed = run_in_process(capsys, *common, "--checkpoint-dir", str(checkpoints), *ONE_STEP[2:], "--epochs", "2")
    assert [(line.step, line.final) for line in resumed] == [(2, False), (None, True)]

    checkpoint = checkpoints / "last.ckpt"
    capsys.readouterr()
    assert cli.main(["asr", *common, "--init-from", str(checkpoint), *ONE_STEP]) == 0
    warm = capsys.readouterr()
    assert f"init-from {checkpoint}: " in warm.err and " 0 skipped (shape), 0 not in the checkpoint" in warm.err
    assert protocol_lines(warm.out)[-1].final
    for other in ("ctc", "hybrid"):
        assert cli.main(["asr", "--data", str(digits), *TINY, "--decoder", other, "--init-from", str(checkpoint), *ONE_STEP]) == 2
        assert (
            f"--init-from {checkpoint}: its decoder is attention, this run's is ctc, transducer or hybrid"
            in capsys.readouterr().err
        )


def test_init_from_takes_an_attention_model_only_with_the_same_labels():
    import torch

    from speechtune_trainer import transfer

    attention = {"encoder.pre_encode.out.weight": torch.zeros(1), "transf_decoder.embedding.token_embedding.weight": torch.zeros(1)}
    assert transfer.attention_problem(attention, attention, same_labels=True) is None
    assert "its token rows are not mapped by character" in transfer.attention_problem(attention, attention, same_labels=False)
    ctc = {"encoder.pre_encode.out.weight": torch.zeros(1), "decoder.decoder_layers.0.weight": torch.zeros(1)}
    assert transfer.attention_problem(ctc, ctc, same_labels=False) is None  # mapped by character as before
    assert "its decoder is ctc, transducer or hybrid, this run's is attention" in transfer.attention_problem(attention, ctc, True)
