#!/usr/bin/env bash
# Issue 31's acceptance table on kjv16 (CPU): which healing makes the best self-speculative draft. Each row
# is a multi-depth export whose full depth verifies (ulsexport onnx --speedups ...), run by
# benchmarks/speculative.py (acceptance, tokens per verify, tokens identical to the full depth's):
#   unhealed    the 2x and 3x uls plans of kjv16 itself;
#   alone       2x and 3x students healed alone (kd on KJV's training split, STEPS each), taken into the
#               export with --depth-model: the full depth stays kjv16 exactly, the drafts' weights are their own;
#   joint       heal --speedups 1,2,3 (3 x STEPS: STEPS per depth): one weight file, the full depth trained too;
#   mixture     as alone, with the default mixture (half the windows sampled by kjv16 itself).
# Usage: bash benchmarks/draft_acceptance_kjv16.sh WORK [STEPS] (default 200); results go to
# benchmarks/results/speculative-cpu (one section per row, beside the earlier ones).
# With a third argument, `plans`: the 3x draft of each plan (uls, bi, angular, greedy-ppl) healed alone on the
# default mixture, STEPS each; each heal's own generality table gives its greedy agreement (the acceptance).
set -euo pipefail
work=${1:?work folder}; steps=${2:-200}
here=$(cd "$(dirname "$0")/.." && pwd); data=$here/../shared/data; model=$here/../shared/models/kjv16
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
ux() { python3 -m ulsexport.cli --quiet "$@"; }
mkdir -p "$work"
heal=(--teacher "$model" --data "$data/kjv-train.txt" --eval-text "$data/kjv-valid.txt" --eval-tokens 20000
      --batch 16 --seq-len 128 --lr 2e-3 --device cpu --force)
case ${3:-} in "" | plans) ;; *) echo "the third argument is plans or nothing, not '$3'" >&2; exit 2;; esac
if [ "${3:-}" = plans ]; then   # (a heal already in WORK is kept)
  for strategy in uls bi angular greedy-ppl; do
    calib=(); [ "$strategy" = uls ] || calib=(--calib "$data/kjv-train.txt")
    [ -f "$work/plan-$strategy-3x/ulsexport.json" ] || ux prune --model "$model" --speedup 3 --strategy "$strategy" \
        ${calib[@]+"${calib[@]}"} --out "$work/plan-$strategy-3x" --force
    [ -f "$work/plan-$strategy-3x-healed/ulsexport.json" ] || ux heal "${heal[@]}" \
        --student "$work/plan-$strategy-3x" --steps "$steps" --out "$work/plan-$strategy-3x-healed"
  done
  python3 - "$work" "$steps" "$here/benchmarks/results/draft-plans-kjv16" <<'PY'
import json, sys
from pathlib import Path
from ulsexport.testing import write_results
work, steps, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
rows = []
for strategy in ("uls", "bi", "angular", "greedy-ppl"):
    manifest = json.loads((work / f"plan-{strategy}-3x-healed" / "ulsexport.json").read_text())
    after, before = manifest["healing"]["quality_after"], manifest["healing"]["quality_before"]
    rows.append({"strategy": strategy, "kept": manifest["kept"], "greedy_before": before["greedy_agreement"],
                 "greedy_after": after["greedy_agreement"], "top1_after": after["top1_agreement"],
                 "perplexity_after": after["perplexity"]})
lines = ["# Which plan makes the best 3x draft (kjv16, CPU)", "",
         f"Each plan's 3x student healed alone on the default mixture (KJV's training split and kjv16's own samples), "
         f"{steps} steps of 16 x 128 tokens, lr 2e-3; greedy agreement (the acceptance rate it would get as a "
         f"self-speculative draft) and top-1 agreement from each heal's own generality table on kjv-valid.txt. "
         f"Command: `bash benchmarks/draft_acceptance_kjv16.sh WORK {steps} plans`.", "",
         "| plan | kept | greedy agreement before -> after | top-1 agreement after | perplexity after |", "|---|---|---|---|---|"]
lines += [f"| {r['strategy']} | {','.join(map(str, r['kept']))} | {r['greedy_before']:.3f} -> {r['greedy_after']:.3f} | "
          f"{r['top1_after']:.3f} | {list(r['perplexity_after'].values())[0]:.2f} |" for r in rows]
write_results(out.with_suffix(".json"), {"rows": rows}, "\n".join(lines) + "\n")
PY
  exit 0
fi
for s in 2 3; do
  ux prune --model "$model" --speedup $s --out "$work/pruned-${s}x" --force
  ux heal "${heal[@]}" --student "$work/pruned-${s}x" --steps "$steps" --teacher-samples 0 --out "$work/alone-${s}x"
  ux heal "${heal[@]}" --student "$work/pruned-${s}x" --steps "$steps" --out "$work/mixture-${s}x"
done
ux heal "${heal[@]}" --speedups 1,2,3 --steps $((3 * steps)) --teacher-samples 0 --out "$work/joint"
ux onnx --model "$model" --speedups 1,2,3 --out "$work/x-unhealed" --force
ux onnx --model "$work/joint" --speedups 1,2,3 --out "$work/x-joint" --force
for how in alone mixture; do
  ux onnx --model "$model" --speedups 1,2,3 --depth-model 2="$work/$how-2x" --depth-model 3="$work/$how-3x" \
      --out "$work/x-$how" --force
done
label() { case $1 in
  unhealed) echo "kjv16: unhealed drafts (uls plans)";;
  alone) echo "kjv16: drafts healed alone ($steps kd steps each on KJV), full depth = kjv16 (--depth-model)";;
  mixture) echo "kjv16: drafts healed alone on the default mixture ($steps steps, half kjv16's samples), full depth = kjv16";;
  joint) echo "kjv16: healed jointly at 1,2,3 ($steps steps per depth), full depth trained too";; esac; }
for how in unhealed alone mixture joint; do
  python3 "$here/benchmarks/speculative.py" --export "$work/x-$how" --text "$data/kjv-valid.txt" --prompts 16 \
      --new-tokens 64 --ks 1,2,4,6 --out "$here/benchmarks/results/speculative-cpu" --label "$(label $how)"
done
