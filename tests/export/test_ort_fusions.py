"""onnxruntime fusions: rotary embedding fused for the installed transformers, and the layout rules."""
import numpy as np
import pytest

from ulsexport.testing import make_tiny_checkpoint

ort = pytest.importorskip("onnxruntime")

from test_onnx import assert_greedy_parity, op_types  # noqa: E402
from ulsexport.export import ort_fusions  # noqa: E402
from ulsexport.export.trace import export_onnx  # noqa: E402


@pytest.mark.parametrize("attention", ["mha", "gqa"])
def test_rotary_embedding_fused(tmp_path, attention):
    src = make_tiny_checkpoint("llama", tmp_path / "hf", num_layers=2)
    result = export_onnx(src, tmp_path / "onnx", attention=attention, kv_cache="concat", quiet=True)
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


def test_projections_packed_into_one_matmul_each(tmp_path):
    """Per layer one MatMul for q/k/v (split into GroupQueryAttention) and one for gate and up (split
    into the SwiGLU), the separate weights gone; tokens and logits as PyTorch's."""
    import onnx

    src = make_tiny_checkpoint("llama", tmp_path / "hf", num_layers=2)
    result = export_onnx(src, tmp_path / "onnx", attention="gqa", kv_cache="concat", quiet=True)
    applied = result.manifest["optimizations"]["applied"]
    assert applied["packed_qkv"] == 2 and applied["packed_shared_input"] == 2
    graph = onnx.load(str(result.out_dir / "model.onnx")).graph
    producers = {out: node for node in graph.node for out in node.output}
    for attention in (n for n in graph.node if n.op_type == "GroupQueryAttention"):
        assert producers[attention.input[2]].op_type == "Split"  # value: straight from the packed projection
        assert {producers[producers[i].input[0]].op_type for i in attention.input[:2]} == {"Split"}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    packed = [n for n in graph.node if n.op_type == "MatMul" and n.input[1].endswith(".packed")]
    assert len(packed) == 2 and all(consumers[m.output[0]] == ["Split"] for m in packed)
    dims = {i.name: list(i.dims) for i in graph.initializer}
    assert all(dims[m.input[1]] == [32, 2 * 64] for m in packed)  # hidden, gate and up side by side
    assert not [name for name in dims if "gate_proj" in name or "up_proj" in name]
    assert_greedy_parity(src, result.out_dir)


def test_greedy_tokens_of_float16_match_float32_argmax():
    from ulsexport.runtime.base import greedy_tokens

    logits = np.random.default_rng(0).standard_normal((6, 1000)).astype(np.float16)
    logits[1] = -np.abs(logits[1])  # all negative: the flipped-magnitude path
    logits[2] = 0
    logits[3, 7] = np.inf
    assert (greedy_tokens(logits) == logits.astype(np.float32).argmax(-1)).all()


# Head size 16: onnxruntime's CPU GroupQueryAttention rotates only multiples of 16.
SHARED_SHAPE = dict(hidden_size=64, intermediate_size=96, head_dim=16, num_attention_heads=4, num_key_value_heads=2)


def test_shared_cache_graph(tmp_path):
    import onnx

    src = make_tiny_checkpoint("llama", tmp_path / "hf", num_layers=3, overrides=SHARED_SHAPE)
    result = export_onnx(src, tmp_path / "onnx", quiet=True)  # the default: gqa, shared cache
    fusions, onnx_section = result.manifest["optimizations"], result.manifest["onnx"]
    assert fusions["variant"] == "gqa-shared" and fusions["applied"]["shared_kv"] == 3 and len(fusions["tried"]) == 1
    assert onnx_section["kv_cache"] == "shared" and onnx_section["max_sequence_length"] == 256
    assert onnx_section["inputs"] == ["input_ids", "attention_mask"]
    graph = onnx.load(str(result.out_dir / "model.onnx")).graph
    attentions = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attentions) == 3
    for node in attentions:  # packed q/k/v in, rotary inside, no attention_bias
        assert node.input[1:3] == ["", ""] and len(node.input) == 9
        assert {a.name: a.i for a in node.attribute}["do_rotary"] == 1
    assert not {"RotaryEmbedding", "Where"} & {n.op_type for n in graph.node}
    producers = {out: node for node in graph.node for out in node.output}
    # the one Split per layer left is the packed gate and up projection's
    assert [producers[n.input[0]].input[1].endswith(".packed") for n in graph.node if n.op_type == "Split"] == [True] * 3
    assert_greedy_parity(src, result.out_dir)  # a left-padded batch, moved to the right by the decoder


def test_shared_cache_fp16(tmp_path):
    src = make_tiny_checkpoint("llama", tmp_path / "hf", num_layers=2, overrides=SHARED_SHAPE)
    result = export_onnx(src, tmp_path / "onnx", dtype="fp16", quiet=True)
    assert result.manifest["onnx"]["kv_cache"] == "shared"
    assert_greedy_parity(src, result.out_dir, dtype="fp16", tolerance=1e-2)


@pytest.mark.parametrize("family,reason", [
    ("mistral", "sliding window: the shared graph drops the mask that applies it"),
    ("qwen3", "q/k norms between the projection and rotary: no packed form"),
])
def test_shared_cache_falls_back_to_concat(tmp_path, family, reason):
    src = make_tiny_checkpoint(family, tmp_path / "hf", num_layers=2, overrides=SHARED_SHAPE)
    result = export_onnx(src, tmp_path / "onnx", quiet=True)
    fusions = result.manifest["optimizations"]
    assert result.manifest["onnx"]["kv_cache"] == "concat", reason
    assert fusions["variant"] == "gqa" and len(fusions["tried"]) == 1  # decided without a second trace
    assert_greedy_parity(src, result.out_dir)


def test_shared_cache_refuses_more_tokens_than_positions(tmp_path):
    from ulsexport.errors import UserError
    from ulsexport.runtime.ort import OnnxDecoder

    src = make_tiny_checkpoint("llama", tmp_path / "hf", num_layers=1,
                               overrides={**SHARED_SHAPE, "max_position_embeddings": 16})
    out = export_onnx(src, tmp_path / "onnx", quiet=True).out_dir
    ids = np.full((1, 10), 5, np.int64)
    with pytest.raises(UserError, match="pass the export's 16 positions"):
        OnnxDecoder(out).greedy(ids, np.ones_like(ids), 7)


@pytest.mark.parametrize("family,overrides,shared", [
    ("llama", {}, True),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, False),
    ("mistral", {"sliding_window": 8}, False),
])
def test_rotary_tables_only_where_one_table_is_exact(family, overrides, shared):
    """The shared graph takes one cos/sin table: none for length-dependent rope or a sliding window."""
    import torch
    from transformers import AutoModelForCausalLM

    from ulsexport.testing import tiny_config
    from ulsexport.export.trace import rotary_tables

    model = AutoModelForCausalLM.from_config(tiny_config(family, 1, {**SHARED_SHAPE, **overrides}))
    tables = rotary_tables(model)
    assert (tables is not None) == shared
    if shared:
        cos, sin = tables
        assert cos.shape == sin.shape == (256, 8)
        positions = torch.arange(256)[None]
        reference = model.model.rotary_emb(torch.zeros(1), positions)[0][0, :, :8].numpy()
        np.testing.assert_allclose(cos, reference, atol=1e-6)
