"""`--decoder attention`: NeMo's encoder-decoder ASR model over the run's characters.

NeMo's `EncDecTransfModelBPE` (audio preprocessor, spec augment, any encoder, NeMo's transformer decoder with
self- and cross-attention, a `TokenClassifier` tied to the decoder's embedding, label-smoothed cross-entropy)
wants a SentencePiece or WordPiece tokenizer read from disk. This subclass changes only what a character
vocabulary needs:

- the tokenizer is NeMo's `CharTokenizer` over the run's labels, after `<pad>`, `<s>` and `</s>`; the rows NeMo
  adds to round the classifier up to a multiple of 8 decode to nothing;
- validation decodes with NeMo's AED decoding (`MultiTaskDecoding`: greedy, or beam search with
  `--beam-size` > 1) inside NeMo's `WER` metric, and logs `val_loss` and `val_wer` the way NeMo's CTC and
  transducer models do, so the trainer's ErrorCounter and ProtocolReporter treat every decoder alike.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nemo.collections.asr.metrics.wer import WER
from nemo.collections.asr.models.asr_model import ASRModel
from nemo.collections.asr.models.transformer_bpe_models import EncDecTransfModelBPE
from nemo.collections.asr.parts.submodules.multitask_decoding import MultiTaskDecoding, MultiTaskDecodingConfig
from nemo.collections.common.tokenizers.char_tokenizer import CharTokenizer

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}  # ids 0, 1, 2; the labels follow


class LabelTokenizer(CharTokenizer):
    """NeMo's character tokenizer over `labels` (ids 3, 4, ...), with the special-token names NeMo's AED decoding reads."""

    def __init__(self, labels: list[str]) -> None:
        with tempfile.TemporaryDirectory(prefix="speechtune-labels-") as scratch:
            vocabulary = Path(scratch) / "vocab.txt"  # CharTokenizer reads one Python literal per line
            vocabulary.write_text("".join(f"{label!r}\n" for label in labels), encoding="utf-8")
            super().__init__(str(vocabulary), **SPECIAL_TOKENS)

    def ids_to_text(self, ids: list[int]) -> str:
        # NeMo rounds the classifier up to a multiple of 8 rows; an untrained decoder may pick a row past the vocabulary.
        return super().ids_to_text([id_ for id_ in ids if id_ < self.vocab_size])

    @property
    def pad(self) -> int:
        return self.pad_id

    @property
    def bos(self) -> int:
        return self.bos_id

    @property
    def eos(self) -> int:
        return self.eos_id


class AttentionModel(EncDecTransfModelBPE):
    """EncDecTransfModelBPE with a character tokenizer and NeMo's WER over AED (greedy or beam) decoding."""

    def __init__(self, cfg, trainer=None) -> None:
        super().__init__(cfg=cfg, trainer=trainer)
        search = self.cfg.beam_search
        decoding = OmegaConf.merge(
            OmegaConf.structured(MultiTaskDecodingConfig),
            {
                "strategy": "greedy_batch" if search.beam_size == 1 else "beam",
                "greedy": {"max_generation_delta": search.max_generation_delta},
                # No length penalty: MultiTaskDecoding reads `beam.length_penalty`, which its config class lacks (0.0).
                "beam": {"beam_size": search.beam_size, "max_generation_delta": search.max_generation_delta},
            },
        )
        self.decoding = MultiTaskDecoding(decoding, self.transf_decoder, self.log_softmax, self.tokenizer)
        self.wer = WER(self.decoding, log_prediction=False)

    def _setup_tokenizer(self, tokenizer_cfg) -> None:
        self.tokenizer = LabelTokenizer(list(tokenizer_cfg.labels))

    def transcribe_batch(self, signal: torch.Tensor, signal_len: torch.Tensor) -> list[str]:
        """The decoded text of a batch of audio (greedy, or beam search with --beam-size > 1)."""
        _, encoded_len, encoded, mask = self.forward(input_signal=signal, input_signal_length=signal_len)
        hypotheses = self.decoding.decode_predictions_tensor(encoder_hidden_states=encoded, encoder_input_mask=mask)
        self._keep_mode()
        return [hypothesis.text for hypothesis in hypotheses]

    def _keep_mode(self) -> None:
        # NeMo's AED decoders leave the decoder and classifier in training mode (dropout on) after decoding.
        self.transf_decoder.train(self.training)
        self.log_softmax.train(self.training)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        signal, signal_len, transcript, transcript_len = batch  # transcripts are <s> text </s>, then <pad>
        log_probs, encoded_len, encoded, mask = self.forward(
            input_signal=signal,
            input_signal_length=signal_len,
            transcript=transcript[:, :-1],
            transcript_length=transcript_len,
        )
        loss = self.transf_loss(log_probs=log_probs, labels=transcript[:, 1:])
        self.wer.update(
            predictions=encoded,
            predictions_lengths=encoded_len,
            predictions_mask=mask,
            targets=transcript,
            targets_lengths=transcript_len,
        )
        self._keep_mode()
        wer, wer_num, wer_denom = self.wer.compute()
        self.wer.reset()
        metrics = {"val_loss": loss, "val_wer_num": wer_num, "val_wer_denom": wer_denom, "val_wer": wer}
        if isinstance(self.trainer.val_dataloaders, list) and len(self.trainer.val_dataloaders) > 1:
            self.validation_step_outputs[dataloader_idx].append(metrics)
        else:
            self.validation_step_outputs.append(metrics)
        return metrics

    def multi_validation_epoch_end(self, outputs, dataloader_idx: int = 0):
        # val_loss (the mean over batches) and val_wer (summed word edits over summed words), as NeMo's CTC model logs them.
        return ASRModel.multi_validation_epoch_end(self, outputs, dataloader_idx)
