#!/usr/bin/env bash
# Issue 32's GPU session in one background job: the decode engine measured in process against
# onnxruntime-genai's Engine and our fixed batch (engine_load.py), then served through Triton with continuous
# batching at each depth (serve_load.py, closed loop), one model and one load for every system.
#
# The device machine needs, in /root/site (carried as wheels, ../shared/device/carry.sh, installed with
# --target): onnxruntime-gpu, onnxruntime-genai-cuda and nvidia-pytriton (its tritonserver); and in WHEELS
# (default /root/wheels) the wheels of the models' environment (benchmarks/stub_env.sh: numpy 1.26,
# onnxruntime-gpu, tokenizers, onnx, protobuf, ml_dtypes, typing_extensions), since the pytriton stub
# needs numpy < 2 and the GPU image's torch needs numpy 2.
#
#   PYTHONPATH=/root/site setsid nohup bash benchmarks/serving_session.sh RESULTS > /root/session.log 2>&1 < /dev/null &
#
# SHAPE (7b), LAYERS (32), CLIENTS (1,32,64), PROMPT_LEN (128), NEW_TOKENS (128), REQUESTS (per setting, 128)
# change the run. DEVICE=cpu checks the script without a GPU (then SHAPE=tiny VOCAB=512: the exports get a
# byte-level tokenizer, which `ulsexport triton` needs to round-trip text; and the models run in this Python). Progress lines go to RESULTS/progress.txt, each step's output to RESULTS/NAME.log.
set -u
results=${1:?results folder}
work=${WORK:-/root/serving-work}; device=${DEVICE:-cuda}
shape=${SHAPE:-7b}; layers=${LAYERS:-32}; clients=${CLIENTS:-1,32,64}
prompt=${PROMPT_LEN:-128}; new=${NEW_TOKENS:-128}
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$results"
. "$here/benchmarks/session_step.sh"   # step NAME COMMAND...
model_python=()
if [ "$device" = cuda ]; then
  step stub-env bash "$here/benchmarks/stub_env.sh" "${WHEELS:-/root/wheels}" /root/stubenv
  export LD_LIBRARY_PATH=$(cat /root/stubenv/cuda-libs 2>/dev/null):${LD_LIBRARY_PATH:-}
  model_python=(--model-python /root/stubenv/bin/python)
fi
max_batch=$(echo "$clients" | tr ',' '\n' | sort -n | tail -1)
# 1. in process: builds the random checkpoint, its uls prunes, our export of each depth and genai's build
step engine-load python3 "$here/benchmarks/engine_load.py" --shape "$shape" --layers "$layers" ${VOCAB:+--vocab "$VOCAB"} --device "$device" \
    --workdir "$work" --clients "$clients" --prompt-len "$prompt" --new-tokens "$new" --out "$results/engine-load"
# 2. served: each depth's export (made by step 1) behind Triton, continuous batching, the same closed loop
for depth in full uls2 uls3; do
  export_dir=$(ls -d "$work"/*/"$depth-ours" 2>/dev/null | head -1)
  [ -n "$export_dir" ] || { echo "$(date +%T) no export of $depth (engine-load failed?)" >> "$results/progress.txt"; continue; }
  step "triton-$depth" python3 -m ulsexport.cli --quiet triton --model "$export_dir" --out "$work/repo-$depth" \
      --name "$depth" --device "$device" --runtime ort --batching continuous --max-batch "$max_batch" \
      --max-tokens "$new" --force
  step "serve-$depth" python3 "$here/benchmarks/serve_load.py" --serve "$work/repo-$depth" "${model_python[@]}" \
      --clients "$clients" --requests "${REQUESTS:-128}" --prompt-len "$prompt:$prompt" --output-len "$new:$new" \
      --out "$results/serve-load" --label "$depth"
done
echo "$(date +%T) done" >> "$results/progress.txt"
