"""Which fused gated-activation ops does this onnxruntime run on CUDA, and what do they compute?

SwiGLU (com.microsoft; a schema in onnxruntime 1.32) and S2SModelSplitQuickGelu (com.microsoft), each on
one packed [rows, 2 * I] fp16 input, against numpy's silu(first half) * second half in float32.

    python benchmarks/experiments/swiglu-op/probe_swiglu.py
"""
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

CASES = {"SwiGLU": {}, "S2SModelSplitQuickGelu": {"alpha": 1.0}}


def session(op: str, attrs: dict, width: int):
    node = helper.make_node(op, ["x"], ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [None, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])


def main():
    print("onnxruntime", ort.__version__, ort.get_available_providers())
    x = np.random.default_rng(0).standard_normal((8, 2 * 11008)).astype(np.float16)
    a, b = x[:, :11008].astype(np.float32), x[:, 11008:].astype(np.float32)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    for op, attrs in CASES.items():
        try:
            y = session(op, attrs, x.shape[1]).run(None, {"x": x})[0].astype(np.float32)
        except Exception as exc:
            print(f"{op}: refused: {str(exc).splitlines()[0][:200]}")
            continue
        for name, ref in (("silu(first) * second", silu(a) * b), ("first * silu(second)", a * silu(b))):
            err = np.abs(y - ref).max() / np.abs(ref).max() if y.shape == ref.shape else float("nan")
            print(f"{op}: output {y.shape}, max error against {name}: {err:.2e}")


if __name__ == "__main__":
    main()
