"""ulsexport's CUDA kernels for onnxruntime (`ulsexport.runtime.kernels`): the graph rewrite and the build
on the CPU; the kernel itself on a GPU (skipped without one, or without nvcc and onnxruntime's headers)."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ulsexport.errors import UserError  # noqa: E402
from ulsexport.runtime import kernels  # noqa: E402


def matmul_graph(k: int, n: int, extra: bool = False):
    """x [rows, K] fp16 @ W [K, N] fp16 -> y; with `extra`, also W used again, an fp32 weight and a product of
    two activations, which stay MatMuls."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float16)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")]
    inits = [numpy_helper.from_array(weight, "w")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["rows", n])]
    if extra:
        nodes += [helper.make_node("MatMul", ["x", "w"], ["y2"], name="again"),
                  helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
                  helper.make_node("MatMul", ["x32", "w32"], ["y3"], name="fp32"),
                  helper.make_node("Transpose", ["y"], ["yt"], perm=[1, 0]),
                  helper.make_node("MatMul", ["y", "yt"], ["y4"], name="activations")]
        inits.append(numpy_helper.from_array(weight.astype(np.float32), "w32"))
        outputs += [helper.make_tensor_value_info(name, elem, shape) for name, elem, shape in
                    (("y2", TensorProto.FLOAT16, ["rows", n]), ("y3", TensorProto.FLOAT, ["rows", n]),
                     ("y4", TensorProto.FLOAT16, ["rows", "rows"]))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["rows", k])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model, weight


def mlp_graph(k: int, f: int):
    """A gated MLP as genai's builder writes it: down(silu(h @ gate) * (h @ up)), silu(g) = g * Sigmoid(g)."""
    rng = np.random.default_rng(3)
    gate, up, down = ((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float16)
                      for shape in ((k, f), (k, f), (f, k)))
    nodes = [helper.make_node("MatMul", ["h", "gate"], ["g"], name="gate_proj"),
             helper.make_node("MatMul", ["h", "up"], ["u"], name="up_proj"),
             helper.make_node("Sigmoid", ["g"], ["s"], name="sigmoid"),
             helper.make_node("Mul", ["g", "s"], ["a"], name="silu"),
             helper.make_node("Mul", ["a", "u"], ["p"], name="product"),
             helper.make_node("MatMul", ["p", "down"], ["y"], name="down_proj")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("h", TensorProto.FLOAT16, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["rows", k])],
                              [numpy_helper.from_array(v, n) for n, v in (("gate", gate), ("up", up), ("down", down))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10

    def reference(h):
        h = h.astype(np.float64)
        g = h @ gate.astype(np.float64)
        return (g / (1 + np.exp(-g)) * (h @ up.astype(np.float64))) @ down.astype(np.float64)

    return model, reference


def test_a_gated_mlp_becomes_one_swiglu_decode_matmul_and_the_down_projection():
    model, _ = mlp_graph(64, 96)
    assert kernels.use_decode_matmul(model) == 3
    ops = [(n.op_type, n.domain) for n in model.graph.node]
    assert ops == [("Transpose", ""), ("Transpose", ""), ("Concat", ""), ("Transpose", ""),
                   ("DecodeMatMul", "com.ulsexport"), ("DecodeMatMul", "com.ulsexport")]
    concat, fused, down = model.graph.node[2], model.graph.node[4], model.graph.node[5]
    assert list(concat.input) == ["gate" + kernels.TRANSPOSED, "up" + kernels.TRANSPOSED]
    assert [helper.get_attribute_value(a) for a in concat.attribute] == [0]  # gate rows, then up rows
    assert list(fused.input) == ["h", concat.output[0]] and list(fused.output) == ["p"]
    assert {a.name: helper.get_attribute_value(a) for a in fused.attribute} == {"swiglu": 1}
    assert list(down.input) == ["p", "down" + kernels.TRANSPOSED] and not down.attribute
    onnx.checker.check_model(model)


def test_shared_weights_and_taken_names_still_make_a_valid_graph():
    """Two MLPs over the same gate and up weights, the gate weight read by a plain MatMul before them, and a
    value already named as the rewrite would name a transposed weight."""
    model, _ = mlp_graph(64, 96)
    graph = model.graph
    second = [helper.make_node(n.op_type, [f"{i}2" if i in {"g", "s", "a", "u"} else i for i in n.input],
                               [f"{o}2" for o in n.output], name=n.name + "2") for n in list(graph.node)[:5]]
    earlier = helper.make_node("MatMul", ["h", "gate"], ["early"], name="early")
    taken = helper.make_node("Identity", ["h"], ["down" + kernels.TRANSPOSED], name="taken")
    nodes = [earlier, taken, *graph.node, *second]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT16, ["rows", d]) for n, d in
                         (("p2", 96), ("early", 96), ("down" + kernels.TRANSPOSED, 64))])
    assert kernels.use_decode_matmul(model) == 6  # two fused MLPs (2 each), "early" and the down projection
    onnx.checker.check_model(model)  # topologically sorted, every value defined once
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Concat") == 1 and ops.count("Transpose") == 3  # gate, up, down: once each
    fused = [n for n in model.graph.node if n.domain == kernels.DOMAIN and n.attribute]
    assert len(fused) == 2 and fused[0].input[1] == fused[1].input[1]
    down = next(n for n in model.graph.node if n.name == "down_proj")
    assert down.input[1] == "down" + kernels.TRANSPOSED + ".1"


def test_a_gated_mlp_whose_parts_are_read_elsewhere_is_not_fused():
    model, _ = mlp_graph(64, 96)
    model.graph.output.append(helper.make_tensor_value_info("g", TensorProto.FLOAT16, ["rows", 96]))
    assert kernels.use_decode_matmul(model) == 3  # gate, up and down, each on its own
    assert "Concat" not in [n.op_type for n in model.graph.node]
    assert [n.op_type for n in model.graph.node].count("Sigmoid") == 1


def test_matmuls_by_fp16_weights_become_decode_matmul_over_the_transposed_weight():
    model, _ = matmul_graph(64, 32, extra=True)
    assert kernels.use_decode_matmul(model) == 2  # "proj" and "again"; not the fp32 weight nor the activations
    by_name = {n.name: n for n in model.graph.node}
    for name in ("proj", "again"):
        assert (by_name[name].op_type, by_name[name].domain) == ("DecodeMatMul", "com.ulsexport")
        assert list(by_name[name].input) == ["x", "w" + kernels.TRANSPOSED]
    assert by_name["fp32"].op_type == by_name["activations"].op_type == "MatMul"
    transposes = [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] == "w"]
    assert len(transposes) == 1  # one transposed copy for both uses
    assert [a.ints for a in transposes[0].attribute if a.name == "perm"] == [[1, 0]]
    order = [n.name for n in model.graph.node]
    assert order.index(transposes[0].name) < order.index("proj")  # topologically sorted still
    assert ("com.ulsexport", 1) in {(o.domain, o.version) for o in model.opset_import}
    onnx.checker.check_model(model)


def test_onnxruntime_folds_the_transpose_into_an_initializer(tmp_path):
    """What the rewrite relies on: the weight's Transpose is folded when the session is made, so no step
    transposes anything. Checked on the CPU provider with Einsum "mk,nk->mn" in DecodeMatMul's place: the
    standard op for its x @ Wt^T, and like it one that onnxruntime cannot move a transpose into (a Gemm
    would absorb it as transB and keep the weight as it was)."""
    model, weight = matmul_graph(64, 32)
    kernels.use_decode_matmul(model)
    proj = next(n for n in model.graph.node if n.name == "proj")
    proj.op_type, proj.domain = "Einsum", ""
    proj.attribute.append(helper.make_attribute("equation", "mk,nk->mn"))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert "Transpose" not in [n.op_type for n in optimized.graph.node]
    assert [list(t.dims) for t in optimized.graph.initializer] == [[32, 64]]  # the weight, transposed
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float16)
    np.testing.assert_allclose(session.run(None, {"x": x})[0].astype(np.float32),
                               x.astype(np.float32) @ weight.astype(np.float32), rtol=1e-2, atol=1e-2)


def test_build_says_what_is_missing(monkeypatch, tmp_path):
    found = {"nvcc": None, "onnxruntime_cxx_api.h": None, "cublas_v2.h": tmp_path}
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    monkeypatch.setattr(kernels, "_first_with", lambda candidates, name: found[name])
    with pytest.raises(UserError, match="needs nvcc"):
        kernels.build_command(tmp_path / "lib.so")
    found["nvcc"] = tmp_path
    with pytest.raises(UserError, match="onnxruntime's C/C\\+\\+ headers"):
        kernels.build_command(tmp_path / "lib.so")


def test_a_named_library_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv(kernels.LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(UserError, match="no such file"):
        kernels.library()
    (tmp_path / "lib.so").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(kernels.LIBRARY_ENV, "lib.so")  # relative: made absolute, or dlopen would search elsewhere
    assert kernels.library() == (tmp_path / "lib.so").resolve()


def test_a_failed_build_names_its_error_and_leaves_no_library(monkeypatch, tmp_path):
    import subprocess

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "build_command", lambda output, arch=None: ["nvcc", "-o", str(output)])
    monkeypatch.setattr(kernels.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "warning: something\nkernel.cu(3): error: identifier \"x\" is undefined\n"))
    with pytest.raises(UserError, match='kernel.cu\\(3\\): error: identifier "x" is undefined'):
        kernels.library(arch="90")
    assert not list(tmp_path.rglob(kernels.LIBRARY_NAME)) and list(tmp_path.rglob("build.log"))


def test_the_decoder_refuses_decode_kernels_off_cuda(tmp_path):
    import json

    from ulsexport.runtime.ort import OnnxDecoder

    (tmp_path / "ulsexport.json").write_text(json.dumps({"kind": "onnx", "onnx": {"file": "model.onnx"}}))
    with pytest.raises(UserError, match="run on CUDA only"):
        OnnxDecoder(tmp_path, "cpu", decode_kernels=True)


def test_a_graph_without_fp16_products_is_refused(tmp_path):
    from ulsexport.runtime.ort import session_graph

    model, _ = matmul_graph(64, 32, extra=True)
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] == "w":
            node.input[1] = "w32"
            node.input[0] = "x32"
    onnx.save(model, tmp_path / "model.onnx")
    with pytest.raises(UserError, match="no MatMul by an fp16 weight"):
        session_graph(str(tmp_path / "model.onnx"), next_inputs=False, decode_kernels=True)


def test_a_library_onnxruntime_cannot_load_is_one_line(tmp_path):
    from ulsexport.runtime.ort import session_options

    (tmp_path / "bad.so").write_bytes(b"not a library")
    with pytest.raises(UserError, match="could not load the kernels library"):
        session_options(str(tmp_path / "m.onnx"), tmp_path, library=tmp_path / "bad.so")


def _cuda_library():
    """The built library; a skip where there is no CUDA device or no toolchain, a failure where it does not
    compile."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA device")
    try:
        return kernels.library()
    except UserError as exc:
        if "could not build" in str(exc):
            raise
        pytest.skip(f"the kernels cannot be built here: {exc}")


def _session(model, **cuda_options):
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(_cuda_library()))
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=[("CUDAExecutionProvider", cuda_options)])


def _relative_error(y, reference) -> float:
    assert y.shape == reference.shape and np.isfinite(y).all()
    return float(np.linalg.norm(y - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("rows", [1, 2, 3, 40])  # 1-2: the GEMV; above: cuBLAS in the same op
@pytest.mark.parametrize("k,n", [(4096, 1536), (4096, 1537),  # an odd count leaves the GEMV's last warp one row
                                 (4104, 1536),   # K not a multiple of the GEMV's stride (1024): its tail
                                 (4100, 1536)])  # K not a multiple of 8: cuBLAS at every row count
def test_decode_matmul_on_cuda_matches_float64(rows, k, n):
    model, weight = matmul_graph(k, n)
    kernels.use_decode_matmul(model)
    session = _session(model)
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float16)
    y = session.run(None, {"x": x})[0]
    assert _relative_error(y, x.astype(np.float64) @ weight.astype(np.float64)) < 1e-3  # fp16 rounding: ~3e-4


def _captured_replays(session, inputs: str, output: str, shape: tuple, features: int, reference, replays: int = 4):
    """Run `session` captured over new inputs in one bound buffer (capture, then replays); each run's
    relative error against `reference`."""
    rng = np.random.default_rng(2)
    x = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float16), "cuda", 0)
    y = ort.OrtValue.ortvalue_from_numpy(np.zeros((shape[0], features), np.float16), "cuda", 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input(inputs, x)
    binding.bind_ortvalue_output(output, y)
    errors = []
    for _ in range(replays):
        values = rng.standard_normal(shape).astype(np.float16)
        x.update_inplace(values)
        session.run_with_iobinding(binding)
        errors.append(_relative_error(y.numpy(), reference(values)))
    return errors


def test_decode_matmul_is_captured_and_replayed():
    model, weight = matmul_graph(1024, 512)
    kernels.use_decode_matmul(model)
    session = _session(model, enable_cuda_graph="1")
    errors = _captured_replays(session, "x", "y", (2, 1024), 512, lambda v: v.astype(np.float64) @ weight)
    assert max(errors) < 1e-3


def test_a_fused_mlp_through_cublas_is_captured_and_replayed():
    """8 rows: cuBLAS, a scratch buffer from onnxruntime's allocator and the SwiGLU kernel, under capture."""
    model, reference = mlp_graph(1024, 2816)
    kernels.use_decode_matmul(model)
    session = _session(model, enable_cuda_graph="1")
    assert max(_captured_replays(session, "h", "y", (8, 1024), 1024, reference)) < 2e-3


@pytest.mark.parametrize("rows", [1, 2, 3, 40])  # 1-2: the GEMVs, the gate's with SwiGLU in it; above: cuBLAS
def test_a_fused_gated_mlp_on_cuda_matches_float64(rows):
    model, reference = mlp_graph(1024, 2816)
    kernels.use_decode_matmul(model)
    h = np.random.default_rng(rows).standard_normal((rows, 1024)).astype(np.float16)
    y = _session(model).run(None, {"h": h})[0]
    assert _relative_error(y, reference(h)) < 2e-3  # two fp16 roundings (p, then y)


def test_multi_depth_exports_refuse_decode_kernels(tmp_path):
    import json

    from ulsexport.runtime.ort import MultiDepthDecoder

    (tmp_path / "ulsexport.json").write_text(json.dumps({"kind": "onnx", "multi_depth": True}))
    with pytest.raises(UserError, match="do not run multi-depth exports"):
        MultiDepthDecoder(tmp_path, "cuda", decode_kernels=True)


def test_the_gpu_arch_comes_from_nvidia_smi(monkeypatch):
    import subprocess

    def smi(stdout: str, returncode: int = 0):
        return lambda *args, **kwargs: subprocess.CompletedProcess(args, returncode, stdout, "")

    monkeypatch.setattr(kernels.subprocess, "run", smi("9.0\n9.0\n"))
    assert kernels.gpu_arch() == "90"
    monkeypatch.setattr(kernels.subprocess, "run", smi("", returncode=9))
    with pytest.raises(UserError, match="compute capability"):
        kernels.gpu_arch()
