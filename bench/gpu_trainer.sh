#!/usr/bin/env bash
# GPU benchmark of speechtune-trainer: generate a few hours of speech in parallel, train an
# 8-layer d_model-256 Conformer-CTC in bf16, print utterances/s, peak GPU memory and the WER
# curve. Under 8 minutes on one H100: make-data about a minute, training capped by TRAIN_BUDGET_S.
#
#   bash bench/gpu_trainer.sh            # needs the [trainer] extra, espeak-ng and sox
#   HOURS=1 EPOCHS=4 bash bench/gpu_trainer.sh
#   ACCELERATOR=cpu HOURS=0.02 EPOCHS=1 bash bench/gpu_trainer.sh   # a smoke test of the script itself
set -euo pipefail

TRAINER=${TRAINER:-$(command -v speechtune-trainer || echo .venv/bin/speechtune-trainer)}
PYTHON=${PYTHON:-$(dirname "$(readlink -f "$TRAINER")")/python}
WORK=${WORK:-$(mktemp -d -t speechtune-bench-XXXX)}
HOURS=${HOURS:-3}
EPOCHS=${EPOCHS:-15}
TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-330}
ACCELERATOR=${ACCELERATOR:-gpu}

if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
echo "work dir: $WORK"

start=$(date +%s)
"$TRAINER" make-data --out "$WORK/data" --hours "$HOURS" --seed 0 --workers "$(nproc)"
echo "make-data: $HOURS h, $(wc -l < "$WORK/data/train_manifest.json") train utterances, $(( $(date +%s) - start )) s"

# At the budget, SIGINT: Lightning stops after the current step and exits 1; the epochs printed so far are summarised.
start=$(date +%s)
timeout --signal=INT "$TRAIN_BUDGET_S" "$TRAINER" asr --data "$WORK/data" --accelerator "$ACCELERATOR" \
    --encoder conformer --num-layers 8 --d-model 256 --attention-heads 4 --conv-kernel-size 31 \
    --n-mels 80 --batch-size 64 --lr 2e-3 --schedule warmup-cosine --warmup-steps 300 \
    --epochs "$EPOCHS" --checkpoint-dir "$WORK/checkpoints" \
    > "$WORK/protocol.jsonl" 2> "$WORK/trainer.log" || echo "trainer exited with $? (1 after SIGINT: stopped at the budget)"
echo "training: $(( $(date +%s) - start )) s (log: $WORK/trainer.log)"

"$PYTHON" - "$WORK" <<'PY'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
utterances = len((work / "data/train_manifest.json").read_text().splitlines())
lines = [json.loads(l) for l in (work / "protocol.jsonl").read_text().splitlines() if l.startswith('{"speechtune"')]
epochs = [l for l in lines if "step" in l]
if not epochs:
    sys.exit("no epoch finished; see trainer.log")
print(f"{'epoch':>5} {'wer':>7} {'cer':>7} {'seconds':>8} {'utt/s':>7}")
for l in epochs:
    print(f"{l['step']:>5} {l['wer']:>7.3f} {l['cer']:>7.3f} {l['epoch_seconds']:>8.1f} {utterances / l['epoch_seconds']:>7.0f}")
steady = epochs[1:] or epochs  # the first epoch pays CUDA and cuDNN warm-up
print(f"utterances/s (train+validation, epochs {steady[0]['step']}+): {utterances * len(steady) / sum(l['epoch_seconds'] for l in steady):.0f}")
print(f"peak GPU memory: {max(l.get('gpu_peak_gib', 0) for l in epochs):.2f} GiB")
print("WER curve:", [round(l["wer"], 3) for l in epochs])
PY
