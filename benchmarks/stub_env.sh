#!/usr/bin/env bash
# The environment Triton's Python backend runs the models in, on a machine whose Python stack needs numpy 2
# (the GPU image's torch): the nvidia-pytriton 0.7.0 stub crashes on string and int64 tensors with numpy 2.
# A venv without pip or system packages holding numpy 1.26, onnxruntime(-gpu), tokenizers and onnx (with its
# protobuf, ml_dtypes and typing_extensions: the runtime adds the argmax output to a decode graph) from the
# wheels in WHEELS (no index), and this repository on its path (a .pth file). CUDA libraries: onnxruntime-gpu
# finds them through LD_LIBRARY_PATH (no torch loads them first in the stub), so the folders of the system
# Python's nvidia packages are written to ENV/cuda-libs for the server's environment.
#
#   bash benchmarks/stub_env.sh WHEELS ENV      # then: ulsexport serve REPO --python ENV/bin/python
set -euo pipefail
wheels=$1; env=$2; repo=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$env"
python3 -m venv --without-pip "$env"
site=$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
python3 -m pip install -q --no-deps --no-index --target "$site" "$wheels"/numpy-1.26.4-*.whl \
    "$(ls "$wheels"/onnxruntime_gpu-*.whl "$wheels"/onnxruntime-*.whl 2>/dev/null | head -1)" "$wheels"/tokenizers-*.whl \
    "$wheels"/onnx-*.whl "$wheels"/protobuf-*.whl "$wheels"/ml_dtypes-*.whl "$wheels"/typing_extensions-*.whl
echo "$repo" > "$site/ulsexport.pth"
python3 - > "$env/cuda-libs" <<'PY'
import glob, os
try:
    import nvidia
    folders = sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/**/lib/*.so*", recursive=True)})
except ImportError:
    folders = []
print(":".join(folders))
PY
LD_LIBRARY_PATH=$(cat "$env/cuda-libs"):${LD_LIBRARY_PATH:-} "$env/bin/python" -c '
import numpy, onnx, onnxruntime as ort, tokenizers, ulsexport
print("numpy", numpy.__version__, "onnx", onnx.__version__, "onnxruntime", ort.__version__, ort.get_available_providers())'
