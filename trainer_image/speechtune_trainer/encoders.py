"""Encoders NeMo 3.0.0 lacks in a CPU-trainable form, built from NeMo's own modules.

- transformer: NeMo's TransformerEncoder uses FlexAttention, which has no backward pass on
  CPU, so this one is NeMo's ConformerEncoder with the convolution modules taken out
  (relative-position self-attention plus the macaron feed-forward blocks).
- gru: NeMo's RNNEncoder accepts rnn_type="gru" but only builds layers for "lstm", so this
  keeps its subsampling, typing and forward and swaps each LSTM for a GRU of the same width.
- connections (`--residual-scale`, `--skip-connections`): ConformerEncoder and LSTMEncoder are
  NeMo's encoders plus those two options; the skips are forward hooks, so the parameters and
  their names are NeMo's.
- blocks (`--conformer-blocks`): ConformerEncoder with each layer rebuilt as NeMo's ConformerLayer of its own
  kernel and feed-forward width, its self-attention replaced by nothing (`noatt`), or dropped (`skip`);
  nas-darts' supernet (darts_search.py) mixes the same blocks.

NeMo only instantiates `_target_`s under approved prefixes; `register` adds this module.
"""

from __future__ import annotations

import torch
from torch import nn

from nemo.collections.asr import modules as nemo_modules
from nemo.collections.asr.parts.submodules.conformer_modules import ConformerLayer
from nemo.core.classes import common
from speechtune_trainer import blocks as block_specs

TARGET_PREFIX = f"{__name__}."


def connect(encoder: nn.Module, entries: list[nn.Module], exits: list[nn.Module], skip: str) -> None:
    """Add skip connections across an encoder's blocks; block i reads at entries[i] and writes at exits[i].

    residual: each block's input is added to its output. long: the first block's input (the
    subsampled, projected features) is added to the last block's output. none: unchanged.
    """
    if skip == "none":
        return
    if skip not in ("residual", "long"):
        raise ValueError(f"skip_connections must be none, residual or long, got {skip!r}")
    pairs = list(zip(entries, exits)) if skip == "residual" else [(entries[0], exits[-1])]
    encoder._skip_inputs = {}
    for index, (entry, exit_) in enumerate(pairs):
        entry.register_forward_pre_hook(_SkipIn(encoder, index), with_kwargs=True)
        exit_.register_forward_hook(_SkipOut(encoder, index))


class _SkipIn:
    """Remembers a block's input (the `x` keyword of a Conformer layer, else the first argument)."""

    def __init__(self, encoder: nn.Module, index: int) -> None:
        self.encoder, self.index = encoder, index

    def __call__(self, module, args, kwargs):
        self.encoder._skip_inputs[self.index] = kwargs["x"] if "x" in kwargs else args[0]


class _SkipOut:
    """Adds the remembered input to the block's output (the first element of a tuple output)."""

    def __init__(self, encoder: nn.Module, index: int) -> None:
        self.encoder, self.index = encoder, index

    def __call__(self, module, args, output):
        skipped = self.encoder._skip_inputs.pop(self.index)
        if isinstance(output, tuple):
            return (output[0] + skipped, *output[1:])
        return output + skipped


class _NoAttention(nn.Module):
    """Stands in for a Conformer layer's self-attention module: adds nothing to the residual."""

    def forward(self, query: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.zeros_like(query)


def conformer_block(block: block_specs.Block, template: ConformerLayer) -> ConformerLayer:
    """A NeMo ConformerLayer shaped as `block` (kernel, feed-forward expansion, attention or not), with the
    width, heads, dropouts and shared relative-position biases of `template`, a layer of the same encoder."""
    attention = template.self_attn
    d_model = template.norm_out.normalized_shape[0]
    layer = ConformerLayer(
        d_model=d_model,
        d_ff=d_model * block.expansion,
        self_attention_model=template.self_attention_model,
        n_heads=template.n_heads,
        conv_kernel_size=block.kernel,
        dropout=template.dropout.p,
        dropout_att=attention.dropout.p,
        pos_bias_u=getattr(attention, "pos_bias_u", None),
        pos_bias_v=getattr(attention, "pos_bias_v", None),
    )
    if not block.attention:
        layer.norm_self_att = nn.Identity()
        layer.self_attn = _NoAttention()
    return layer


class ConformerEncoder(nemo_modules.ConformerEncoder):
    """NeMo's ConformerEncoder with `residual_scale` (the weight of each layer's two feed-forward
    residual branches, NeMo's fixed half step `fc_factor` 0.5), `skip_connections` (see connect) and
    `blocks` (`--conformer-blocks`: one block spec per layer, see blocks.py; `skip` positions are dropped)."""

    def __init__(
        self, residual_scale: float | None = None, skip_connections: str = "none", blocks: list[str] | None = None, **kwargs
    ):
        super().__init__(**kwargs)
        if blocks is not None:
            template = self.layers[0]  # NeMo's: the encoder's width, heads, dropouts and shared position biases
            kept = [conformer_block(block, template) for block in map(block_specs.parse, blocks) if not block.skip]
            self.layers = nn.ModuleList(kept)
            self.n_layers = len(kept)
            self.layer_drop_probs = self.layer_drop_probs[: len(kept)]
        if residual_scale is not None:
            for layer in self.layers:
                layer.fc_factor = residual_scale
        if len(self.layers):  # --conformer-blocks may skip every position: nothing to connect across
            connect(self, list(self.layers), list(self.layers), skip_connections)


class LSTMEncoder(nemo_modules.RNNEncoder):
    """NeMo's RNNEncoder with `skip_connections` (see connect); a block is an RNN, its LayerNorm and its dropout."""

    def __init__(self, skip_connections: str = "none", **kwargs):
        super().__init__(**kwargs)
        self._connect(skip_connections)

    def _connect(self, skip: str) -> None:
        blocks = [self.layers[start : start + 3] for start in range(0, len(self.layers), 3)]
        connect(self, [block[0] for block in blocks], [block[-1] for block in blocks], skip)


class _NoConvolution(nn.Module):
    """Stands in for a Conformer layer's convolution module: adds nothing to the residual."""

    def forward(self, x: torch.Tensor, pad_mask=None, cache=None) -> torch.Tensor:
        return torch.zeros_like(x)


class TransformerEncoder(ConformerEncoder):
    """ConformerEncoder without convolution modules; accepts ConformerEncoder's arguments (and ours)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for layer in self.layers:
            layer.norm_conv = nn.Identity()
            layer.conv = _NoConvolution()


class GRUEncoder(LSTMEncoder):
    """RNNEncoder with bidirectional GRU layers; `d_model` is the output width (half per direction)."""

    def __init__(self, feat_in: int, n_layers: int, d_model: int, dropout: float = 0.2, skip_connections: str = "none"):
        super().__init__(
            feat_in=feat_in,
            n_layers=n_layers,
            d_model=d_model,
            proj_size=d_model,
            rnn_type="lstm",
            bidirectional=True,
            subsampling="striding",
            subsampling_factor=4,
            dropout=dropout,
        )
        for index, layer in enumerate(self.layers):
            if isinstance(layer, nn.LSTM):
                self.layers[index] = nn.GRU(
                    input_size=d_model, hidden_size=d_model // 2, num_layers=1, batch_first=True, bidirectional=True
                )
        self._connect(skip_connections)  # after the swap: the hooks belong on the GRUs


def register() -> None:
    """Allow NeMo's config instantiation to build these classes (idempotent)."""
    if TARGET_PREFIX not in common.ALLOWED_TARGET_PREFIXES:
        common.ALLOWED_TARGET_PREFIXES.append(TARGET_PREFIX)
