"""onnxruntime fusions: rotary embedding fused for the installed transformers, and the layout rules."""
import numpy as np
import pytest

from tiny_models import make_tiny_checkpoint

ort = pytest.importorskip("onnxruntime")

from test_onnx import assert_greedy_parity, op_types  # noqa: E402
from ulsexport import ort_fusions  # noqa: E402
from ulsexport.export_onnx import export_onnx  # noqa: E402


@pytest.mark.parametrize("attention", ["mha", "gqa"])
def test_rotary_embedding_fused(tmp_path, attention):
    src = make_tiny_checkpoint("llama", tmp_path / "hf", num_layers=2)
    result = export_onnx(src, tmp_path / "onnx", attention=attention, quiet=True)
    fusions = result.manifest["optimizations"]
    assert fusions["kept"] and fusions["variant"] == attention and fusions["applied"]["cos_sin_cache"] > 0
    ops = op_types(result.out_dir)
    assert "RotaryEmbedding" in ops
    assert {"mha": "MultiHeadAttention", "gqa": "GroupQueryAttention"}[attention] in ops
    assert_greedy_parity(src, result.out_dir)


def test_layout_rules_apply_rotary_to_projection():
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    heads, head_dim, max_pos = 2, 8, 16
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "split_shape"], ["split"]),
         helper.make_node("Transpose", ["split"], ["heads"], perm=[0, 2, 1, 3]),
         helper.make_node("RotaryEmbedding", ["heads", "position_ids", "cos", "sin"], ["rotated"],
                          domain="com.microsoft"),
         helper.make_node("Transpose", ["rotated"], ["back"], perm=[0, 2, 1, 3]),
         helper.make_node("Reshape", ["back", "merge_shape"], ["y"])],
        "rotary",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", heads * head_dim]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("cos", TensorProto.FLOAT, [max_pos, head_dim // 2]),
         helper.make_tensor_value_info("sin", TensorProto.FLOAT, [max_pos, head_dim // 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", heads * head_dim])],
        [helper.make_tensor("split_shape", TensorProto.INT64, [4], [0, 0, heads, head_dim]),
         helper.make_tensor("merge_shape", TensorProto.INT64, [3], [0, 0, -1])])
    proto = onnx.shape_inference.infer_shapes(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)], ir_version=10))

    model = ir.serde.deserialize_model(proto)
    assert ort_fusions._layout_rules().apply_to_model(model) == 1
    RemoveUnusedNodesPass()(model)
    nodes = list(model.graph)
    rotary = [n for n in nodes if n.op_type == "RotaryEmbedding"]
    assert len(rotary) == 1 and rotary[0].inputs[0] is model.graph.inputs[0]
    assert rotary[0].attributes["num_heads"].as_int() == heads
    assert not any(n.op_type == "Transpose" for n in nodes)

    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 5, heads * head_dim), dtype=np.float32),
             "position_ids": rng.integers(0, max_pos, (2, 5)),
             "cos": rng.standard_normal((max_pos, head_dim // 2), dtype=np.float32),
             "sin": rng.standard_normal((max_pos, head_dim // 2), dtype=np.float32)}

    def run(model_proto):
        session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, feeds)[0]

    np.testing.assert_allclose(run(ir.serde.serialize_model(model)), run(proto), atol=1e-6)


def test_gqa_projections_packed_into_one_matmul(tmp_path):
    import onnx

    src = make_tiny_checkpoint("llama", tmp_path / "hf", num_layers=2)
    result = export_onnx(src, tmp_path / "onnx", attention="gqa", quiet=True)
    assert result.manifest["optimizations"]["applied"]["packed_qkv"] == 2
    graph = onnx.load(str(result.out_dir / "model.onnx")).graph
    producers = {out: node for node in graph.node for out in node.output}
    for attention in (n for n in graph.node if n.op_type == "GroupQueryAttention"):
        assert producers[attention.input[2]].op_type == "Split"  # value: straight from the packed projection
        assert {producers[producers[i].input[0]].op_type for i in attention.input[:2]} == {"Split"}
    assert_greedy_parity(src, result.out_dir)


def test_greedy_tokens_of_float16_match_float32_argmax():
    from ulsexport.ort_runner import greedy_tokens

    logits = np.random.default_rng(0).standard_normal((6, 1000)).astype(np.float16)
    logits[1] = -np.abs(logits[1])  # all negative: the flipped-magnitude path
    logits[2] = 0
    logits[3, 7] = np.inf
    assert (greedy_tokens(logits) == logits.astype(np.float32).argmax(-1)).all()
