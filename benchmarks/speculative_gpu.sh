#!/usr/bin/env bash
# Issue 31 on a GPU, end to end: SmolLM2 (or MODEL) exported at 1, 2 and 3 with the drafts healed alone
# (onnx --depth-model: the full depth stays the original), then `ulsexport validate --speculative` for each
# draft and K: tokens identical to the full depth's, acceptance, tokens per verify, and the speculative loop
# timed against the full depth's fastest loop at batch 1.
# Run after `SET=drafts ... bash benchmarks/heal_quality_gpu.sh WORK RESULTS smollm2 STEPS` (its healed
# 2x and 3x students); needs onnxruntime-gpu importable (carried as wheels and installed with --target
# /root/ortsite, benchmarks/gpu_session.sh says how; put that folder on PYTHONPATH).
#   bash benchmarks/speculative_gpu.sh WORK RESULTS_DIR STEPS [MODEL]
# DEVICE (cuda), DTYPE (fp16), KS (1,2,3,4) and NEW_TOKENS (128) change the run. On CUDA validate runs the
# captured speculative loop (runtime/speculative.py) against the full depth's captured greedy decode. Exits non-zero if any
# validate failed to run or found tokens that differ from the full depth's (the table is written either way).
set -euo pipefail
work=${1:?work folder}; results=${2:?results folder}; steps=${3:?the heal runs\' steps}; model=${4:-}
device=${DEVICE:-cuda}; dtype=${DTYPE:-fp16}
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
ux() { python3 -m ulsexport.cli "$@"; }
[ -n "$model" ] || model=$(python3 -c "from ulsexport.testing import smollm2_checkpoint as s; print(s())")
mkdir -p "$results"
if compgen -G "$results/speculative-*" > /dev/null; then   # the table is this run's reports only; delete nothing
  echo "$results already holds speculative-* reports: give a fresh results folder" >&2; exit 2
fi
failed=0
export_drafts() { ux --quiet onnx --model "$model" --speedups 1,2,3 --depth-model 2="$work/healed-2x-mix-$steps" \
    --depth-model 3="$work/healed-3x-mix-$steps" --dtype "$1" --device "$device" --out "$work/drafts-multi" --force; }
# An export that misses its dtype's parity tolerance writes nothing and fails (SmolLM2 in fp16 on the CPU: 1.6e-2
# against 1e-2); then the drafts are timed in fp32 rather than not at all, and the table says which dtype ran.
if ! export_drafts "$dtype"; then
  [ "$dtype" = fp32 ] && exit 1
  echo "the $dtype export was refused (its log above); exporting in fp32" >&2; dtype=fp32; export_drafts fp32
fi
speculative() {  # draft, report name, K options: one validate --speculative, its reports in RESULTS
  ux --quiet validate --candidate "$work/drafts-multi" --speculative "$1" --runtime ort --device "$device" \
      --new-tokens "${NEW_TOKENS:-128}" --parity-steps "${NEW_TOKENS:-128}" "${@:3}" \
      --json "$results/speculative-$1-$2.json" --report "$results/speculative-$1-$2.md" || failed=1
}
for draft in 2x 3x; do
  ks=${KS:-1,2,3,4}
  for k in ${ks//,/ }; do speculative "$draft" "k$k" --draft-tokens "$k"; done
  speculative "$draft" adaptive --draft-tokens 6 --adaptive
done
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
python3 - "$results" "${gpu:-$device}" "$dtype" <<'PY'
import json, sys
from pathlib import Path
results, device, dtype = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
lines = [f"# Self-speculative decoding end to end, drafts healed alone (device: {device}, {dtype})", "",
         "| draft | K | loop | parity | acceptance | tokens / verify | full tok/s | speculative tok/s | speedup |",
         "|---|---|---|---|---|---|---|---|---|"]
def parity(p):   # identical tokens; or parted only at near ties (the full depth's margin within fp16's rounding)
    ties = sum(m.get("near_tie", False) for m in p["mismatches"])
    return ("pass" if not p["mismatches"] else f"pass, {ties} near tie(s)") if p["passed"] else "FAIL"
for path in sorted(results.glob("speculative-*.json")):
    r = json.loads(path.read_text())
    a, s = r["acceptance"], r.get("speed") or {}
    k = f"adaptive, <= {r['draft_tokens']}" if r["adaptive"] else r["draft_tokens"]
    loop = r.get("loop", "plain") + (" (verify uncaptured)" if r.get("verify_capture_off") else "")
    lines.append(f"| {r['draft']} | {k} | {loop} | {parity(r['parity'])} | {a['acceptance_rate']:.3f} | "
                 f"{a['tokens_per_verify']:.2f} | {s.get('full_tokens_per_s', 0):.1f} | "
                 f"{s.get('speculative_tokens_per_s', 0):.1f} | {s.get('speedup', 0):.2f}x |")
(results / "speculative-summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
exit $failed
