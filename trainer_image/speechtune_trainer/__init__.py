"""speechtune's NeMo trainer: `speechtune-trainer make-data` and `speechtune-trainer asr` (see docs/trainer.md).

Installed with the `trainer` extra; it imports nothing from speechtune but speechtune.protocol.
"""
