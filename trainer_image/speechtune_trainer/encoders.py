"""Encoders NeMo 3.0.0 lacks in a CPU-trainable form, built from NeMo's own modules.

- transformer: NeMo's TransformerEncoder uses FlexAttention, which has no backward pass on
  CPU, so this one is NeMo's ConformerEncoder with the convolution modules taken out
  (relative-position self-attention plus the macaron feed-forward blocks).
- gru: NeMo's RNNEncoder accepts rnn_type="gru" but only builds layers for "lstm", so this
  keeps its subsampling, typing and forward and swaps each LSTM for a GRU of the same width.

NeMo only instantiates `_target_`s under approved prefixes; `register` adds this module.
"""

from __future__ import annotations

import torch
from torch import nn

from nemo.collections.asr.modules import ConformerEncoder, RNNEncoder
from nemo.core.classes import common

TARGET_PREFIX = f"{__name__}."


class _NoConvolution(nn.Module):
    """Stands in for a Conformer layer's convolution module: adds nothing to the residual."""

    def forward(self, x: torch.Tensor, pad_mask=None, cache=None) -> torch.Tensor:
        return torch.zeros_like(x)


class TransformerEncoder(ConformerEncoder):
    """ConformerEncoder without convolution modules; accepts ConformerEncoder's arguments."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for layer in self.layers:
            layer.norm_conv = nn.Identity()
            layer.conv = _NoConvolution()


class GRUEncoder(RNNEncoder):
    """RNNEncoder with bidirectional GRU layers; `d_model` is the output width (half per direction)."""

    def __init__(self, feat_in: int, n_layers: int, d_model: int, dropout: float = 0.2):
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


def register() -> None:
    """Allow NeMo's config instantiation to build these classes (idempotent)."""
    if TARGET_PREFIX not in common.ALLOWED_TARGET_PREFIXES:
        common.ALLOWED_TARGET_PREFIXES.append(TARGET_PREFIX)
