"""`nas-darts` and `asr --conformer-blocks`: the search reports and derives asr flags, asr retrains them,
the blocks change the built encoder, architecture and weight steps move only their own parameters, and
bad flags are rejected before torch's import.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from speechtune.protocol import parse_line
from speechtune_trainer import blocks, cli, config
from tests.speechtune_trainer.test_cli import refused_before_torch
from tests.speechtune_trainer.test_connections import build, encoder_args

pytestmark = pytest.mark.trainer

TINY = ["--accelerator", "cpu", "--threads", "1", "--d-model", "32", "--n-mels", "40", "--attention-heads", "2"]
CANDIDATES = "k3-ff2-att,k7-ff2-noatt,skip"


def run_in_process(capsys, *argv: str) -> list:
    capsys.readouterr()
    assert cli.main(list(argv)) == 0
    return [parsed for parsed in map(parse_line, capsys.readouterr().out.splitlines()) if parsed is not None]


def test_search_reports_each_epoch_resumes_and_its_final_params_retrain_with_asr(digits, capsys, tmp_path):
    common = [
        "nas-darts", "--data", str(digits), *TINY, "--num-layers", "2", "--candidates", CANDIDATES,
        "--batch-size", "16", "--checkpoint-dir", str(tmp_path / "search"),
    ]
    first = run_in_process(capsys, *common, "--epochs", "1")
    assert [(line.step, line.final) for line in first] == [(1, False), (None, True)]
    assert (tmp_path / "search" / "last.ckpt").is_file()
    resumed = run_in_process(capsys, *common, "--epochs", "2")  # from last.ckpt: only epoch 2 runs
    assert [(line.step, line.final) for line in resumed] == [(2, False), (None, True)]

    for line in (first[0], resumed[0]):
        assert set(line.metrics) >= {"wer", "cer", "val_loss", "arch_entropy"}
        assert 0 <= line.metrics["cer"] < math.inf and math.isfinite(line.metrics["val_loss"])
        assert 0 < line.metrics["arch_entropy"] <= math.log(3) + 1e-9  # three candidates: at most ln 3
    final = resumed[-1]
    assert final.metrics["wer"] == resumed[0].metrics["wer"]
    params = final.extra["params"]
    assert set(params) == {"num_layers", "conformer_blocks"} and params["num_layers"] == 2
    assert all(block in CANDIDATES.split(",") for block in params["conformer_blocks"].split(","))

    # The retrain path: the same flags plus the params, appended as the engine does (underscored).
    retrain = [f"--{name}={value}" for name, value in params.items()]
    lines = run_in_process(
        capsys, "asr", "--data", str(digits), *TINY, "--epochs", "1", "--train-hours", "0.004", "--batch-size", "64", *retrain
    )
    assert [line.step for line in lines if not line.final] == [1] and lines[-1].final


# -- the built modules (no data, no training) ----------------------------------------------------



def encode(encoder):
    import torch

    features = torch.randn(2, 16, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return encoder(audio_signal=features, length=torch.tensor([40, 32]))[0]


def test_conformer_blocks_change_each_layer_and_skip_drops_one():
    torch = pytest.importorskip("torch")
    default = build(config.encoder_config(encoder_args("--conv-kernel-size", "15")))
    # The default's blocks spelled out build NeMo's encoder: the same parameters, the same output.
    spelled = build(config.encoder_config(encoder_args("--conformer-blocks", "k15-ff4-att,k15-ff4-att")))
    assert {n: p.shape for n, p in spelled.state_dict().items()} == {n: p.shape for n, p in default.state_dict().items()}
    spelled.load_state_dict(default.state_dict())
    assert torch.allclose(encode(spelled), encode(default))

    mixed = build(config.encoder_config(encoder_args("--conformer-blocks", "k7-ff2-noatt,k31-ff4-att")))
    assert [layer.conv.depthwise_conv.kernel_size[0] for layer in mixed.layers] == [7, 31]
    assert [layer.feed_forward1.linear1.out_features for layer in mixed.layers] == [64, 128]
    assert [len(list(layer.self_attn.parameters())) > 0 for layer in mixed.layers] == [False, True]  # noatt: none
    assert sum(p.numel() for p in mixed.parameters()) < sum(p.numel() for p in default.parameters())
    assert encode(mixed).shape == encode(default).shape and torch.isfinite(encode(mixed)).all()

    skipped = build(config.encoder_config(encoder_args("--conformer-blocks", "k15-ff4-att,skip")))
    assert len(skipped.layers) == 1 and len(default.layers) == 2
    assert encode(skipped).shape == encode(default).shape
    none = build(config.encoder_config(encoder_args("--conformer-blocks", "skip,skip", "--skip-connections", "long")))
    assert len(none.layers) == 0 and encode(none).shape == encode(default).shape  # the subsampled features


def supernet(candidates: str = CANDIDATES):
    pytest.importorskip("torch")
    from speechtune_trainer import darts_search

    cfg = config.encoder_config(encoder_args())
    cfg = {**cfg, "_target_": "speechtune_trainer.darts_search.SupernetEncoder", "candidates": candidates.split(",")}
    return build(cfg).train(), darts_search


def test_architecture_steps_move_only_the_alphas_and_weight_steps_only_the_weights():
    import torch

    encoder, darts_search = supernet()
    weights, alphas = darts_search.split_parameters(encoder, encoder)
    assert len(alphas) == 2 and {id(a) for a in alphas}.isdisjoint(map(id, weights))
    assert encoder.arch_entropy() == pytest.approx(math.log(3), abs=1e-4)  # nearly uniform at the start
    arch_optimizer = torch.optim.Adam(alphas, lr=0.1)
    weight_optimizer = torch.optim.AdamW(weights, lr=0.01)
    features = torch.randn(2, 16, 40, generator=torch.Generator().manual_seed(1))

    def step(optimizer) -> tuple[list, list]:
        before = [p.detach().clone() for p in alphas], [p.detach().clone() for p in weights]
        arch_optimizer.zero_grad(), weight_optimizer.zero_grad()
        encoder(audio_signal=features, length=torch.tensor([40, 32]))[0].square().mean().backward()
        optimizer.step()
        changed_alphas = [not torch.equal(a, b) for a, b in zip(before[0], alphas)]
        changed_weights = [not torch.equal(a, b) for a, b in zip(before[1], weights)]
        return changed_alphas, changed_weights

    alphas_moved, weights_moved = step(arch_optimizer)
    assert all(alphas_moved) and not any(weights_moved)
    alphas_moved, weights_moved = step(weight_optimizer)
    assert not any(alphas_moved) and any(weights_moved)


def test_the_derived_network_runs_each_layers_argmax_block():
    import torch

    encoder, _ = supernet()
    with torch.no_grad():
        for layer in encoder.layers:
            layer.alpha.copy_(torch.tensor([0.0, 0.0, 5.0]))  # skip wins everywhere
    assert encoder.derive() == [blocks.Block(), blocks.Block()]
    encoder.eval().set_derived(True)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        _, pos_emb = encoder.pos_enc(x=x)
        assert torch.equal(encoder.layers[0](x=x, pos_emb=pos_emb), x)  # the identity alone, not a weighted sum
        encoder.set_derived(False)
        assert not torch.equal(encoder.layers[0](x=x, pos_emb=pos_emb), x)


# -- flags, before torch -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "flags", "message"),
    [
        ("nas-darts", ["--candidates=k4-ff2-att,skip"], "--candidates 'k4-ff2-att,skip': 'k4-ff2-att': the kernel size must be odd"),
        ("nas-darts", ["--candidates=k7-ff2-att,conv"], "'conv' is not a block"),
        ("nas-darts", ["--candidates=skip"], "--candidates has 1 operation; a search needs at least 2"),
        ("nas-darts", ["--arch_split=1.5"], "--arch-split is the share of the train manifest held out, in (0, 1)"),
        ("nas-darts", ["--arch-lr=0"], "--arch-lr must be positive"),
        ("nas-darts", ["--encoder=lstm"], "--encoder lstm: nas-darts searches Conformer blocks"),
        ("nas-darts", ["--conformer-blocks=skip,skip"], "--conformer-blocks is what nas-darts derives"),
        ("asr", ["--conformer_blocks=k15-ff4-att"], "--conformer-blocks gives 1 blocks but --num-layers is 2"),
        ("asr", ["--conformer-blocks=k15-ff0-att,skip"], "the feed-forward expansion must be at least 1"),
        ("asr", ["--encoder=gru", "--conformer-blocks=skip,skip"], "--conformer-blocks only applies to --encoder conformer"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag_before_torch(data_dir, command, flags, message):
    assert message in refused_before_torch(command, data_dir, flags)


def test_split_holds_out_the_share_spread_over_the_manifest():
    from speechtune_trainer import darts

    weights, arch = darts.split([str(i) for i in range(10)], 0.3)
    assert len(arch) == 3 and len(weights) == 7 and arch == ["3", "6", "9"]
    assert blocks.format_list(blocks.parse_list(blocks.DEFAULT_CANDIDATES)) == blocks.DEFAULT_CANDIDATES
    assert len(blocks.default_candidates()) == 13


def test_a_study_retrains_the_architecture_its_supernet_stage_derived(digits, tmp_path):
    """Issue 16's two stages through the engine and the real trainers: nas-darts, then asr runs that
    all get the architecture the supernet's final line reported, held while their lr is searched."""
    import asyncio

    from speechtune import record, spec
    from speechtune.executor import Executor
    from speechtune.local import LocalProcessBackend
    from speechtune.storage import WriteThroughStorage, open_rdb

    trainer = str(Path(sys.executable).parent / "speechtune-trainer")
    shared = ["--data", str(digits), *TINY, "--num-layers", "2", "--epochs", "1", "--batch-size", "16"]
    manifest = {"metadata": {"name": "darts"}, "spec": {
        "objective": {"metric": "wer", "direction": "minimize"}, "parallelism": 1, "maxFailedTrials": 0,
        "searchSpace": [{"name": "lr", "categorical": [1e-3, 3e-3]}],
        "stages": [
            {"name": "supernet", "kind": "baseline",
             "trialTemplate": {"command": [trainer, "nas-darts"], "args": [*shared, "--candidates", CANDIDATES]}},
            {"name": "retrain", "kind": "search", "maxTrials": 2, "sampler": {"type": "grid"},
             "handoff": {"from": ["supernet"], "params": True}},
        ],
        "trialTemplate": {"command": [trainer, "asr"], "args": shared},
        "storage": {"url": f"sqlite:///{tmp_path}/darts.db"}}}
    launched = {}

    class Recording(LocalProcessBackend):
        async def launch(self, launch):
            launched[launch.number] = list(launch.argv)
            return await super().launch(launch)

    engine = Executor(spec.parse_study(manifest), WriteThroughStorage(open_rdb(manifest["spec"]["storage"]["url"])),
                      Recording(tmp_path / "logs"))
    outcome = asyncio.run(engine.run())
    assert outcome.state == "Succeeded", outcome.message
    supernet, *retrain = engine.study.trials
    derived = supernet.user_attrs[record.REPORTED_PARAMS]
    assert derived["num_layers"] == 2 and all(block in CANDIDATES.split(",") for block in derived["conformer_blocks"].split(","))
    assert record.stages(engine.study.user_attrs)["retrain"]["handoff"]["params"] == derived
    assert len(retrain) == 2 and all(set(t.params) == {"lr"} and t.state.name == "COMPLETE" for t in retrain)
    for trial in retrain:  # asr ran with the derived blocks (it refuses blocks that do not match --num_layers)
        assert launched[trial.number][:2] == [trainer, "asr"]
        assert {f"--num_layers={derived['num_layers']}", f"--conformer_blocks={derived['conformer_blocks']}"} <= set(launched[trial.number])
