"""Graph fusions for onnxruntime after export: onnxscript's, with grouped-query attention that keeps the mask.

onnxscript's own GroupQueryAttention rule replaces the attention mask by lengths taken from
position_ids (its source says it assumes onnxruntime-genai's usage), so a left-padded batch would
attend to its pad tokens. The rule here matches the same attention (key/value heads repeated to the
query heads after the cache concat) and keeps the mask as GroupQueryAttention's attention_bias:
every row is given the full length (seqlens_k = total - 1), the cache is laid out exactly as the
unfused graph's concat, and the bias masks the padding. Rotary embedding stays outside (do_rotary=0),
so positions are the model's own position_ids.

GroupQueryAttention takes query, key and value as [batch, sequence, heads * head_dim], the layout
the projections produce. Two layout rules then remove the round trips the model's own
[batch, heads, sequence, head_dim] layout leaves around it: rotary embedding is applied to the
projection directly (onnxruntime's RotaryEmbedding takes that layout too), and a reshape that only
splits the last axis, followed by one that merges it back, is dropped. Last, the query, key and
value projections are packed into one MatMul (`pack_qkv_projections`).

onnxscript's cos/sin cache rule, which turns rotary embedding into onnxruntime's RotaryEmbedding,
matches the frequencies as transformers computed them up to 5.17 (MatMul, then Transpose); a second
rule matches the product newer versions compute (position_ids[..., None] * inv_freq).
"""
from __future__ import annotations


def fuse_for_ort(ir_model, grouped_query_attention: bool = True):
    """onnxscript's `optimize_for_ort`, its GroupQueryAttention rule replaced by the mask-keeping one
    (or by none); returns (model, fusion counts)."""
    from unittest import mock

    from onnx_ir.passes import common as common_passes
    from onnxscript.rewriter.ort_fusions import _core, optimize_for_ort

    replacement = _masked_gqa_fusion() if grouped_query_attention else (lambda model, **_: 0)
    with mock.patch.object(_core, "fuse_gqa", replacement), \
            mock.patch.object(_core, "fuse_cos_sin_cache", _cos_sin_cache_fusion()):
        model, counts = optimize_for_ort(ir_model)
    if grouped_query_attention and counts.get("gqa"):
        counts["gqa_layout"] = _layout_rules().apply_to_model(model)
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.IdentityEliminationPass()(model)
        counts["packed_qkv"] = pack_qkv_projections(model)
    counts["packed_shared_input"] = pack_shared_input_projections(model)
    common_passes.CommonSubexpressionEliminationPass()(model)  # one length computation for all layers
    return model, counts


def _cos_sin_cache_fusion():
    """onnxscript's cos/sin cache rules, then the same for freqs = Cast(Unsqueeze(position_ids)) * inv_freq."""
    import onnx_ir as ir
    from onnxscript.rewriter import _fusion_utils, _ir_utils, pattern
    from onnxscript.rewriter.ort_fusions import cos_sin_cache

    class MulCosSinCacheFusion(cos_sin_cache.CosSinCacheFusion):
        """inv_freq [E] times position_ids [B, S, 1]: no MatMul or Transpose; the rewrite is onnxscript's."""

        def pattern(self, op, x, inv_freq, position_ids, interleaved, num_heads, freqs, dtype, extra_dims):
            freqs = op.Mul(op.Cast(op.Unsqueeze(position_ids, extra_dims), to=ir.DataType.FLOAT), inv_freq)
            emb = op.Concat(freqs, freqs, axis=-1)
            cos, sin = op.Cos(emb), op.Sin(emb)
            if self._cast:
                cos, sin = op.Cast(cos, to=dtype), op.Cast(sin, to=dtype)
            return op.RotaryEmbedding(x, op.Unsqueeze(cos, [1]), op.Unsqueeze(sin, [1]), interleaved=interleaved,
                                      num_heads=num_heads, _domain="ai.onnxruntime._fusion")

        def check(self, context, inv_freq, position_ids, extra_dims, **_):
            if not (_ir_utils.has_rank(position_ids, 2)
                    and _ir_utils.is_singleton_value(extra_dims, lambda axis: axis in (-1, 2))):
                return pattern.MatchResult().fail("position_ids is not [batch, sequence] unsqueezed last",
                                                  position_ids)
            if inv_freq.const_value is None or not _ir_utils.has_rank(inv_freq, 1):
                return pattern.MatchResult().fail("inv_freq is not a constant 1-D tensor", inv_freq)
            return True

    fuse_mul = _fusion_utils.apply_fusion_rules(pattern.RewriteRuleSet([
        MulCosSinCacheFusion.rule("CosSinCacheMul_cast", cast=True),
        MulCosSinCacheFusion.rule("CosSinCacheMul", cast=False)]))

    def fuse(model, **kwargs):
        return cos_sin_cache.fuse_cos_sin_cache(model, **kwargs) + fuse_mul(model, **kwargs)

    return fuse


def _masked_gqa_fusion():
    import onnx_ir as ir
    from onnxscript.rewriter import _fusion_utils, pattern

    class MaskedGroupQueryAttention(pattern.RewriteRuleClassBase):
        def __init__(self):  # the cache concats are graph outputs: leave removal to dead-code elimination
            super().__init__("MaskedGroupQueryAttention", remove_nodes=False)

        def pattern(self, op, query, key, value, past_key, past_value, mask):
            key_cache = op.Concat(past_key, key, axis=-2)
            value_cache = op.Concat(past_value, value, axis=-2)
            key_heads = op.Reshape(op.Expand(op.Unsqueeze(key_cache, [2]), pattern.ANY_VALUE), pattern.ANY_VALUE)
            value_heads = op.Reshape(op.Expand(op.Unsqueeze(value_cache, [2]), pattern.ANY_VALUE),
                                     pattern.ANY_VALUE)
            attention = op.SDPA(query, key_heads, value_heads, mask, key_format="BHSd",
                                _domain="ai.onnxruntime._fusion", _outputs=["attention"])
            return attention, key_cache, value_cache

        def check(self, context, query, past_key, mask, **_):
            heads, kv_heads = _static_dim(query, 1), _static_dim(past_key, 1)
            if heads is None or kv_heads is None or heads % kv_heads:
                return pattern.MatchResult().fail("head counts unknown", [query, past_key])
            if mask.dtype != query.dtype:  # attention_bias must be additive, in the query's dtype
                return pattern.MatchResult().fail("mask is not an additive bias", mask)
            if mask.shape is None or len(mask.shape) != 4 or mask.shape[0] != query.shape[0]:
                return pattern.MatchResult().fail("mask is not [batch, 1|heads, query, total]", mask)
            self.heads, self.kv_heads = heads, kv_heads
            return True

        def rewrite(self, op, query, key, value, past_key, past_value, mask, attention, **_):
            to_bsd = op.Constant(value_ints=[0, 0, -1])
            query_bsd, key_bsd, value_bsd = (op.Reshape(op.Transpose(t, perm=[0, 2, 1, 3]), to_bsd)
                                             for t in (query, key, value))
            # lengths from the mask, which all layers share, so that one computation serves them all
            total = op.Shape(mask, start=3, end=4)
            batch = op.Shape(mask, start=0, end=1)
            seqlens_k = op.Cast(op.Expand(op.Sub(total, op.Constant(value_ints=[1])), batch), to=ir.DataType.INT32)
            total_scalar = op.Cast(op.Squeeze(total), to=ir.DataType.INT32)
            scale = attention.producer().attributes.get("scale")
            output, present_key, present_value = op.GroupQueryAttention(
                query_bsd, key_bsd, value_bsd, past_key, past_value, seqlens_k, total_scalar,
                None, None, None, mask, num_heads=self.heads, kv_num_heads=self.kv_heads, do_rotary=0,
                **({"scale": scale.as_float()} if scale is not None else {}),
                _domain="com.microsoft", _outputs=3)
            batch_dim, _, seq_dim, head_dim = query.shape
            output.shape = ir.Shape([batch_dim, seq_dim, self.heads * head_dim])  # for the layout rules
            output.dtype = query.dtype
            heads_shape = op.Constant(value_ints=[0, 0, self.heads, -1])
            return op.Transpose(op.Reshape(output, heads_shape), perm=[0, 2, 1, 3]), present_key, present_value

    return _fusion_utils.apply_fusion_rules(pattern.RewriteRuleSet([MaskedGroupQueryAttention.rule()]))


def _layout_rules():
    """Rotary embedding on [batch, sequence, hidden] and split-then-merge reshapes dropped (module doc)."""
    from onnxscript.rewriter import pattern

    to_heads = [0, 2, 1, 3]

    class RotaryOnProjection(pattern.RewriteRuleClassBase):
        def pattern(self, op, x, split_shape, position_ids, cos, sin, merge_shape):
            heads = op.Transpose(op.Reshape(x, split_shape, _outputs=["split"]), perm=to_heads)
            rotated = op.RotaryEmbedding(heads, position_ids, cos, sin, _domain="com.microsoft", _outputs=["rotated"])
            return op.Reshape(op.Transpose(rotated, perm=to_heads), merge_shape, _outputs=["merged"])

        def check(self, context, x, split, merged, rotated, **_):
            if not (_splits_last_axis(x, split) and _merges_to(x, merged)):
                return pattern.MatchResult().fail("not a split and merge of the last axis", [split, merged])
            if not isinstance(split.shape[2], int):
                return pattern.MatchResult().fail("head count unknown", split)
            return True

        def rewrite(self, op, x, split, position_ids, cos, sin, rotated, **_):
            attributes = {name: attr.value for name, attr in rotated.producer().attributes.items()}
            return op.RotaryEmbedding(x, position_ids, cos, sin, _domain="com.microsoft",
                                      **{**attributes, "num_heads": split.shape[2]})

    class SplitThenMerge(pattern.RewriteRuleClassBase):
        def pattern(self, op, x, split_shape, merge_shape):
            return op.Reshape(op.Reshape(x, split_shape, _outputs=["split"]), merge_shape, _outputs=["merged"])

        def check(self, context, x, split, merged, **_):
            if not (_splits_last_axis(x, split) and _merges_to(x, merged)):
                return pattern.MatchResult().fail("not a split and merge of the last axis", [split, merged])
            return True

        def rewrite(self, op, x, **_):
            return op.Identity(x)

    return pattern.RewriteRuleSet([RotaryOnProjection.rule(), SplitThenMerge.rule()])


def _splits_last_axis(x, split) -> bool:
    """`split` ([b, s, h, d]) is rank-3 `x` ([b, s, h*d]) with only its last axis split."""
    import onnx_ir as ir

    if x.shape is None or len(x.shape) != 3:
        return False
    shape = _const_ints(split.producer().inputs[1])
    if shape is not None and len(shape) == 4 and shape[:2] == [0, 0]:
        return True
    return split.shape is not None and len(split.shape) == 4 and all(
        _same_dim(a, b) for a, b in zip(x.shape[:2], split.shape[:2])) and not isinstance(split.shape[3], ir.SymbolicDim)


def _merges_to(x, merged) -> bool:
    """`merged` has `x`'s rank-3 shape: its two leading axes, its last axis merged back."""
    shape = _const_ints(merged.producer().inputs[1])
    if shape == [0, 0, -1]:
        return True
    return merged.shape is not None and len(merged.shape) == 3 and all(
        _same_dim(a, b) for a, b in zip(x.shape, merged.shape))


def _same_dim(a, b) -> bool:
    """Dimensions known to be equal: the same int, or the same named symbol."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.value is not None and a.value == b.value


def _const_ints(value) -> list[int] | None:
    import onnx_ir as ir

    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(v) for v in tensor.numpy().reshape(-1)]


def _static_dim(value, axis: int):
    shape = value.shape
    if shape is None or len(shape) <= axis or not isinstance(shape[axis], int):
        return None
    return shape[axis]


def pack_qkv_projections(model) -> int:
    """One MatMul for the query, key and value projections of each GroupQueryAttention, split after it.

    One GEMM instead of three per layer. It also keeps onnxruntime's own GroupQueryAttentionFusion
    (CUDA, 1.31) off our nodes: that fusion fires on MatMul -> RotaryEmbedding -> GroupQueryAttention,
    drops the attention_bias input and leaves an invalid node ("The sum of input arg count is not
    equal to size of input defs").
    """
    graph, packed = model.graph, 0
    for attention in [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]:
        projections = [_projection_of(value) for value in attention.inputs[:3]]
        if any(p is None for p in projections) or len({p.inputs[0] for p in projections}) != 1:
            continue
        packed += _pack_projections(graph, projections, "qkv")
    _drop_unused_initializers(graph)
    return packed


def pack_shared_input_projections(model) -> int:
    """One MatMul for the constant-weight MatMuls that read the same input, split after it: the gate and
    up projections of a gated MLP, and q/k/v where `pack_qkv_projections` did not run (no
    GroupQueryAttention). One wider GEMM reads the same weight bytes with fewer launches per layer."""
    graph, groups = model.graph, {}
    for node in graph:
        if node.op_type == "MatMul" and node.domain == "" and _constant_matrix(node.inputs[1]):
            groups.setdefault(node.inputs[0], []).append(node)
    packed = sum(_pack_projections(graph, nodes, "packed") for nodes in groups.values() if len(nodes) > 1)
    _drop_unused_initializers(graph)
    return packed


def _pack_projections(graph, projections, suffix: str) -> int:
    """Replace MatMuls of one input by constant [K, N_i] weights with one MatMul by the weights side by
    side and a Split into the old outputs; 1, or 0 where the weights' K differ."""
    import numpy as np
    import onnx_ir as ir

    weights = [p.inputs[1].const_value.numpy() for p in projections]
    if len({w.shape[0] for w in weights}) != 1:
        return 0
    first = projections[0].inputs[1]
    weight = ir.Value(name=f"{first.name}.{suffix}", const_value=ir.tensor(np.concatenate(weights, axis=1)))
    sizes = ir.Value(name=f"{first.name}.{suffix}_sizes",
                     const_value=ir.tensor(np.array([w.shape[1] for w in weights], np.int64)))
    graph.register_initializer(weight)
    graph.register_initializer(sizes)
    matmul = ir.node("MatMul", [projections[0].inputs[0], weight])
    split = ir.node("Split", [matmul.outputs[0], sizes], {"axis": -1}, num_outputs=len(projections))
    earliest = min(projections, key=lambda p: graph.index(p))
    graph.insert_before(earliest, [matmul, split])
    for projection, part in zip(projections, split.outputs):
        part.shape, part.dtype = projection.outputs[0].shape, projection.outputs[0].dtype
        projection.outputs[0].replace_all_uses_with(part)
    graph.remove(projections, safe=True)
    return 1


def _constant_matrix(value) -> bool:
    return value is not None and value.const_value is not None and value.shape is not None and len(value.shape) == 2


def _projection_of(value):
    """The MatMul by a constant rank-2 weight that makes `value`, directly or through RotaryEmbedding,
    used only on that path; else None."""
    node = value.producer() if value is not None else None
    if node is not None and node.op_type == "RotaryEmbedding" and len(value.uses()) == 1:
        value = node.inputs[0]
        node = value.producer()
    if node is None or node.op_type != "MatMul" or len(value.uses()) != 1:
        return None
    return node if _constant_matrix(node.inputs[1]) else None


def _drop_unused_initializers(graph) -> None:
    unused = [name for name, value in graph.initializers.items() if not value.uses() and not value.is_graph_output()]
    for name in unused:
        del graph.initializers[name]


def share_kv_buffer(model, cos_table, sin_table) -> int:
    """Rewrite every GroupQueryAttention into the form onnxruntime's fastest decode path takes; the count.

    The packed q/k/v projection goes into GroupQueryAttention itself, which applies rotary embedding
    (do_rotary=1, positions from the lengths, over `cos_table`/`sin_table` [max positions, rotary
    dim / 2]) and appends the new key/value into the cache at each row's own length. Lengths come
    from the attention mask as onnxruntime-genai's graphs take them: seqlens_k = real tokens - 1 per
    row, total_sequence_length = the mask's width. So rows are right-padded, the cache can be one
    buffer bound as both past and present (present has the past's shape when the past is the
    longer), and no attention_bias is needed: the padding mask is dropped, which is only right where
    attention is causal with no sliding window (the caller's check). All nodes or none: where one
    does not match (a norm between projection and rotary, interleaved rotary, no packed projection),
    the model is left as it was and 0 returned.
    """
    import numpy as np
    import onnx_ir as ir
    from onnx_ir.passes import common as common_passes

    graph = model.graph
    attentions = [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    packed = [_packed_rotary_projection(node) for node in attentions]
    mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
    if not attentions or mask is None or any(p is None for p in packed):
        return 0

    dtype = attentions[0].inputs[0].dtype
    cos = ir.Value(name="cos_cache", const_value=ir.tensor(np.asarray(cos_table, dtype.numpy())))
    sin = ir.Value(name="sin_cache", const_value=ir.tensor(np.asarray(sin_table, dtype.numpy())))
    graph.register_initializer(cos)
    graph.register_initializer(sin)
    one = ir.Value(name="lengths.one", const_value=ir.tensor(np.array([1], np.int64)))
    graph.register_initializer(one)
    real_tokens = ir.node("ReduceSum", [mask, one], {"keepdims": 0})
    last_index = ir.node("Sub", [real_tokens.outputs[0], one])
    seqlens_k = ir.node("Cast", [last_index.outputs[0]], {"to": ir.DataType.INT32})
    width = ir.node("Shape", [mask], {"start": 1, "end": 2})
    width_scalar = ir.node("Squeeze", [width.outputs[0]])
    total = ir.node("Cast", [width_scalar.outputs[0]], {"to": ir.DataType.INT32})
    lengths = [real_tokens, last_index, seqlens_k, width, width_scalar, total]
    graph.insert_before(next(iter(graph)), lengths)

    for attention, projection in zip(attentions, packed):
        keep = {name: attr.value for name, attr in attention.attributes.items()
                if name in ("num_heads", "kv_num_heads", "scale", "softcap")}
        fused = ir.node("GroupQueryAttention",
                        [projection, None, None, *attention.inputs[3:5], seqlens_k.outputs[0], total.outputs[0],
                         cos, sin],
                        {**keep, "do_rotary": 1, "rotary_interleaved": 0}, domain="com.microsoft", num_outputs=3)
        graph.insert_before(attention, fused)
        for old, new in zip(attention.outputs, fused.outputs):
            new.shape, new.dtype = old.shape, old.dtype
            name = old.name
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            old.name, new.name = None, name
        graph.remove(attention, safe=True)
    present_length = ir.SymbolicDim("present_sequence_length")
    for value in graph.outputs:
        if value.producer() is not None and value.producer().op_type == "GroupQueryAttention" and value.shape:
            value.shape = ir.Shape([*value.shape[:2], present_length, *value.shape[3:]])
    common_passes.RemoveUnusedNodesPass()(model)
    for unused in [v for v in graph.inputs if not v.uses() and v.name == "position_ids"]:
        graph.inputs.remove(unused)
    _drop_unused_initializers(graph)
    return len(attentions)


def _packed_rotary_projection(attention):
    """The packed q/k/v MatMul output feeding `attention` as Split -> RotaryEmbedding (q, k) and Split (v),
    with nothing else on the path; else None."""
    query, key, value = attention.inputs[:3]
    rotaries = [v.producer() if v is not None else None for v in (query, key)]
    if any(r is None or r.op_type != "RotaryEmbedding" or r.attributes.get_int("interleaved", 0)
           or r.attributes.get_int("rotary_embedding_dim", 0) for r in rotaries):
        return None
    if value is None or any(v is not None for v in attention.inputs[7:10]):
        return None
    split = value.producer()
    if split is None or split.op_type != "Split" or [r.inputs[0] for r in rotaries] != list(split.outputs[:2]) \
            or split.outputs[2] is not value or len(split.outputs) != 3:
        return None
    packed = split.inputs[0]
    return packed if packed.producer() is not None and packed.producer().op_type == "MatMul" else None
