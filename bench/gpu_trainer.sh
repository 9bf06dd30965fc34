#!/usr/bin/env bash
# GPU benchmark of speechtune-trainer: generate an hour of speech in parallel, then train an 8-layer
# d_model-256 Conformer-CTC on the same seed and global batch in up to three runs:
#   bf16  1 GPU, --precision bf16-mixed
#   fp32  1 GPU, --precision 32                  (bf16 against fp32 WER on the same seed)
#   ddp   2 GPUs, --devices 2, bf16-mixed        (only where torch sees at least 2 GPUs)
# and print per run the WER curve, utterances/s and peak GPU memory, plus the WER of every run at the
# last epoch all of them finished. Each run is capped at TRAIN_BUDGET_S: about 8 minutes on one H100/H200.
#
#   bash bench/gpu_trainer.sh                       # needs the [trainer] extra, espeak-ng and sox
#   RUNS="bf16 ddp" HOURS=3 EPOCHS=10 TRAIN_BUDGET_S=330 bash bench/gpu_trainer.sh
#   ACCELERATOR=cpu RUNS="fp32 ddp" HOURS=0.02 EPOCHS=1 NUM_LAYERS=1 D_MODEL=64 BATCH=8 bash bench/gpu_trainer.sh  # smoke test
set -euo pipefail

TRAINER=${TRAINER:-$(command -v speechtune-trainer || echo .venv/bin/speechtune-trainer)}
PYTHON=${PYTHON:-$(dirname "$(readlink -f "$TRAINER")")/python}
WORK=${WORK:-$(mktemp -d -t speechtune-bench-XXXX)}
HOURS=${HOURS:-1}
EPOCHS=${EPOCHS:-6}
TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-130}
ACCELERATOR=${ACCELERATOR:-gpu}
RUNS=${RUNS:-bf16 fp32 ddp}
BATCH=${BATCH:-64}  # the global batch of every run: a DDP run's processes take BATCH/2 each
NUM_LAYERS=${NUM_LAYERS:-8}
D_MODEL=${D_MODEL:-256}
SEED=${SEED:-0}

if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
echo "work dir: $WORK; torch sees $gpus GPU(s)"

start=$(date +%s)
"$TRAINER" make-data --out "$WORK/data" --hours "$HOURS" --seed 0 --workers "$(nproc)"
echo "make-data: $HOURS h, $(wc -l < "$WORK/data/train_manifest.json") train utterances, $(( $(date +%s) - start )) s"

train() {  # train NAME FLAGS...: at the budget, SIGINT (Lightning stops after the current step, exit 1)
    local name=$1 start
    shift
    start=$(date +%s)
    timeout --signal=INT "$TRAIN_BUDGET_S" "$TRAINER" asr --data "$WORK/data" --accelerator "$ACCELERATOR" \
        --encoder conformer --num-layers "$NUM_LAYERS" --d-model "$D_MODEL" --attention-heads 4 --conv-kernel-size 31 \
        --n-mels 80 --global-batch-size "$BATCH" --lr 2e-3 --schedule warmup-cosine --warmup-steps 300 \
        --epochs "$EPOCHS" --seed "$SEED" "$@" \
        > "$WORK/$name.jsonl" 2> "$WORK/$name.log" || echo "$name: trainer exited with $? (1 after SIGINT: stopped at the budget)"
    echo "$name: $(( $(date +%s) - start )) s, flags: $* (log: $WORK/$name.log)"
}

for run in $RUNS; do
    case $run in
        bf16) train bf16 --devices 1 --precision bf16-mixed ;;
        fp32) train fp32 --devices 1 --precision 32 ;;
        ddp)
            if [ "$ACCELERATOR" = cpu ]; then
                train ddp --devices 2 --precision 32
            elif [ "$gpus" -ge 2 ]; then
                train ddp --devices 2 --precision bf16-mixed
            else
                echo "ddp: skipped, torch sees $gpus GPU (NCCL needs a GPU per process)"
            fi ;;
        *) echo "unknown run '$run' (RUNS takes bf16, fp32, ddp)" >&2; exit 2 ;;
    esac
done

"$PYTHON" - "$WORK" $RUNS <<'PY'
import json, sys
from pathlib import Path

work, names = Path(sys.argv[1]), sys.argv[2:]
utterances = len((work / "data/train_manifest.json").read_text().splitlines())
curves = {}
for name in names:
    path = work / f"{name}.jsonl"
    if not path.exists():
        continue
    lines = [json.loads(l) for l in path.read_text().splitlines() if l.startswith('{"speechtune"')]
    epochs = [l for l in lines if "step" in l]
    if not epochs:
        print(f"{name}: no epoch finished; see {name}.log")
        continue
    curves[name] = {l["step"]: l for l in epochs}
    print(f"\n{name}\n{'epoch':>5} {'wer':>7} {'cer':>7} {'val_loss':>9} {'seconds':>8} {'utt/s':>7}")
    for l in epochs:
        print(f"{l['step']:>5} {l['wer']:>7.3f} {l['cer']:>7.3f} {l.get('val_loss', float('nan')):>9.3f} "
              f"{l['epoch_seconds']:>8.1f} {utterances / l['epoch_seconds']:>7.0f}")
    steady = epochs[1:] or epochs  # the first epoch pays CUDA and cuDNN warm-up
    print(f"utterances/s (train+validation, all processes, epochs {steady[0]['step']}+): "
          f"{utterances * len(steady) / sum(l['epoch_seconds'] for l in steady):.0f}")
    print(f"peak GPU memory (per process): {max(l.get('gpu_peak_gib', 0) for l in epochs):.2f} GiB")
if curves:
    common = min(max(curve) for curve in curves.values())
    print(f"\nWER at epoch {common}, the last every run finished (same seed, global batch):")
    for name, curve in curves.items():
        print(f"  {name:>5}: {curve[common]['wer']:.4f} (cer {curve[common]['cer']:.4f})")
PY
