"""`--residual-scale` and `--skip-connections`: each changes the built encoder, and their defaults change nothing.

Encoders are built from config.encoder_config on a fixed input with a fixed seed, in eval mode (no
dropout), without data or training: a second or so per case.
"""

from __future__ import annotations

import importlib

import pytest

from speechtune_trainer import cli, config

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")

NEMO_TARGETS = {
    "conformer": "nemo.collections.asr.modules.ConformerEncoder",
    "transformer": "speechtune_trainer.encoders.TransformerEncoder",
    "lstm": "nemo.collections.asr.modules.RNNEncoder",
    "gru": "speechtune_trainer.encoders.GRUEncoder",
}


def encoder_args(*flags: str):
    return cli.build_parser().parse_args(
        cli.with_dashes(["asr", "--data", "d", "--num-layers", "2", "--d-model", "32", "--n-mels", "16", *flags])
    )


def build(cfg: dict, seed: int = 0):
    options = dict(cfg)
    module, _, name = options.pop("_target_").rpartition(".")
    torch.manual_seed(seed)
    return getattr(importlib.import_module(module), name)(**options).eval()


def encode(encoder) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 16, 40, generator=generator)
    with torch.no_grad():
        return encoder(audio_signal=features, length=torch.tensor([40, 32]))[0]


def shapes(encoder) -> dict:
    return {name: tuple(tensor.shape) for name, tensor in encoder.state_dict().items()}


@pytest.mark.parametrize("encoder", config.ENCODERS)
def test_the_defaults_build_the_encoder_as_before(encoder):
    cfg = config.encoder_config(encoder_args("--encoder", encoder))
    assert cfg["_target_"] == NEMO_TARGETS[encoder]
    assert "residual_scale" not in cfg and "skip_connections" not in cfg
    built = build(cfg)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in built.modules())


@pytest.mark.parametrize("encoder", ["conformer", "lstm"])
def test_our_encoder_at_the_defaults_is_nemos_bit_for_bit(encoder):
    cfg = config.encoder_config(encoder_args("--encoder", encoder))
    ours = {"conformer": "speechtune_trainer.encoders.ConformerEncoder", "lstm": "speechtune_trainer.encoders.LSTMEncoder"}
    theirs, mine = build(cfg), build({**cfg, "_target_": ours[encoder]})
    assert torch.equal(encode(theirs), encode(mine))


@pytest.mark.parametrize(
    ("encoder", "flags"),
    [
        ("conformer", ["--residual-scale", "1.0"]),
        ("transformer", ["--residual-scale", "0.25"]),
        *[(encoder, ["--skip-connections", skip]) for encoder in config.ENCODERS for skip in ("residual", "long")],
    ],
)
def test_each_connection_option_changes_the_output_but_no_parameter(encoder, flags):
    default = build(config.encoder_config(encoder_args("--encoder", encoder)))
    connected = build(config.encoder_config(encoder_args("--encoder", encoder, *flags)))
    assert shapes(connected) == shapes(default)  # the same weights (same seed): only the wiring differs
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), connected.state_dict().values()))
    before, after = encode(default), encode(connected)
    assert before.shape == after.shape and torch.isfinite(after).all()
    assert not torch.allclose(before, after)


def test_residual_scale_sets_every_conformer_layers_half_step():
    built = build(config.encoder_config(encoder_args("--residual-scale", "0.8")))
    assert [layer.fc_factor for layer in built.layers] == [0.8, 0.8]
    assert [layer.fc_factor for layer in build(config.encoder_config(encoder_args())).layers] == [0.5, 0.5]


@pytest.mark.parametrize("encoder", ["lstm", "gru"])
def test_a_residual_skip_adds_the_blocks_input_and_a_long_skip_spans_all_blocks(encoder):
    one = encoder_args("--encoder", encoder, "--num-layers", "1")
    plain = build(config.encoder_config(one))
    residual = build(config.encoder_config(encoder_args("--encoder", encoder, "--num-layers", "1", "--skip-connections", "residual")))
    long = build(config.encoder_config(encoder_args("--encoder", encoder, "--num-layers", "1", "--skip-connections", "long")))
    features = torch.randn(2, 16, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        projected, _ = plain.pre_encode(features.transpose(1, 2), torch.tensor([40, 32]))
    # One block: its input is the projected features, and both skips add exactly that.
    torch.testing.assert_close(encode(residual) - encode(plain), projected.transpose(1, 2), rtol=1e-5, atol=1e-5)
    assert torch.equal(encode(residual), encode(long))
    # Two blocks: a residual skip around each differs from one long skip around both.
    two = [build(config.encoder_config(encoder_args("--encoder", encoder, "--skip-connections", skip))) for skip in ("residual", "long")]
    assert not torch.allclose(encode(two[0]), encode(two[1]))


def test_a_connected_encoder_trains_a_gradient_step():
    built = build(config.encoder_config(encoder_args("--residual-scale", "1.0", "--skip-connections", "residual"))).train()
    features = torch.randn(2, 16, 40, generator=torch.Generator().manual_seed(1))
    built(audio_signal=features, length=torch.tensor([40, 32]))[0].square().mean().backward()
    assert all(parameter.grad is not None for parameter in built.layers.parameters())
