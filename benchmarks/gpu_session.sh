#!/usr/bin/env bash
# Every GPU measurement of the project, run in the background on the device machine: healing kjv16,
# fp16 ONNX parity of a 1B-shaped model, then the 7B-shaped speed benchmark (both ONNX builders).
#
# The machine needs onnxruntime-gpu installed in /root/ortsite, with onnxruntime-genai-cuda 0.18.0 and onnx_ir
# 1.1.0 beside it (carried as wheels in parts: `bash ../shared/device/carry.sh onnxruntime-gpu==1.31.1
# onnxruntime-genai-cuda==0.18.0 onnx_ir==1.1.0` prints the calls; install with --target /root/ortsite). Then one
# call starts this script in the background, and later calls (each within 30 s of the last, so the machine
# stays warm) sleep, print $RESULTS/progress.txt and copy the result files out.
# The repository is copied to /root/repo first, so that later calls (which re-sync the working
# tree) cannot change code under a running job. Results and logs go to $RESULTS (default /root/results).
#
#   setsid nohup bash benchmarks/gpu_session.sh [STEPS] > /root/session.log 2>&1 < /dev/null &
#
# STEPS: comma-separated, from heal,parity,fusion,bench,cuda-graph,captured,gemm,gemm-probe,kernels,tensorrt,stub-env,serve,multi-depth,engine-load (default:
# heal,parity,bench, in that order). CUDA_GRAPH_ARGS, TENSORRT_ARGS, SERVE_ARGS, MULTI_DEPTH_ARGS and ENGINE_LOAD_ARGS pass extra
# flags to their scripts; PYTHON names the interpreter of the serve and multi-depth steps. cuda-graph, captured,
# kernels and serve share WORK (default /root/w), so the artifacts one builds the next reuses.
# stub-env makes /root/stubenv (benchmarks/stub_env.sh, from the wheels in WHEELS, default /root/wheels),
# the environment Triton's Python backend runs the models in; serve runs its models there.
# BENCH_STAGES and BENCH_ATTENTION pass --stages and --attention to gpu_benchmark.py; FUSION_LAYERS
# sets the model depth of the fusion step (default 8).
set -u
RESULTS=${RESULTS:-/root/results}
STEPS=${1:-heal,parity,bench}
mkdir -p "$RESULTS"
rm -rf /root/repo && cp -r "$(pwd)" /root/repo && cd /root/repo || exit 1
export PYTHONPATH=/root/ortsite:/root/repo:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WORK=${WORK:-/root/w}
WHEELS=${WHEELS:-/root/wheels}
KERNEL_ARTIFACTS=${KERNEL_ARTIFACTS:-"$WORK/uls2-torch:ort $WORK/uls2-genai:ort $WORK/full-genai:ort $WORK/full-genai:genai"}

results=$RESULTS
. benchmarks/session_step.sh   # step NAME COMMAND...

for s in ${STEPS//,/ }; do
  case $s in
    heal)   step heal python3 benchmarks/heal_kjv16.py --device cuda --quiet --results "$RESULTS/heal" ;;
    parity) step parity python3 benchmarks/experiments/onnx-gpu-parity/onnx_gpu_parity.py "$RESULTS/parity" ;;
    fusion) step fusion python3 benchmarks/experiments/attention-fusion/attention_fusion_speed.py --shape 7b \
                --layers "${FUSION_LAYERS:-8}" --results "$RESULTS/fusion" --workdir /root/fusion
            rm -rf /root/fusion ;;
    bench)  step bench python3 benchmarks/gpu_benchmark.py --results "$RESULTS/bench" \
                --attention "${BENCH_ATTENTION:-gqa}" \
                --stages "${BENCH_STAGES:-build,torch,onnx,ort,genai-torch,profile,clean-onnx,genai}" ;;
    cuda-graph) step cuda-graph python3 benchmarks/cuda_graph_decode.py --workdir "$WORK" \
                --results "$RESULTS/cuda-graph" ${CUDA_GRAPH_ARGS:-} ;;
    tensorrt) step tensorrt python3 benchmarks/tensorrt_build.py --results "$RESULTS/tensorrt" \
                --workdir /root/tensorrt-work ${TENSORRT_ARGS:-} ;;
    captured) step captured python3 benchmarks/captured_step_time.py --workdir "$WORK" \
                --json "$RESULTS/captured/captured-step-time.json" ;;
    gemm)   step gemm python3 benchmarks/gemm_layout.py --json "$RESULTS/gemm/gemm-layout.json" ;;
    gemm-probe) step gemm-probe python3 benchmarks/experiments/gemm-kernels/gemm_kernel_probe.py "$WORK/uls2-genai" \
                --json "$RESULTS/gemm-probe/gemm-kernel-probe.json" ;;
    kernels) step kernels python3 benchmarks/decode_kernel_time.py $KERNEL_ARTIFACTS --batch 1 8 \
                --json "$RESULTS/kernels/decode-kernels-per-layer.json" ;;
    stub-env) step stub-env bash benchmarks/stub_env.sh "$WHEELS" /root/stubenv ;;
    serve) export LD_LIBRARY_PATH=$(cat /root/stubenv/cuda-libs 2>/dev/null):${LD_LIBRARY_PATH:-}
           step serve "${PYTHON:-python3}" benchmarks/serve_gpu.py --workdir "$WORK" \
                --results "$RESULTS/serve" --model-python /root/stubenv/bin/python ${SERVE_ARGS:-} ;;
    multi-depth) step multi-depth "${PYTHON:-python3}" benchmarks/multi_depth_gpu.py --workdir /root/multi-depth-work \
                --results "$RESULTS/multi-depth" ${MULTI_DEPTH_ARGS:-} ;;
    engine-load) step engine-load python3 benchmarks/engine_load.py --workdir /root/engine-load-work \
                --out "$RESULTS/engine-load/engine-load" ${ENGINE_LOAD_ARGS:-} ;;
    *) echo "unknown step $s" >> "$RESULTS/progress.txt" ;;
  esac
done
echo "$(date +%T) all done" >> "$RESULTS/progress.txt"
