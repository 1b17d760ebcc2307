"""Which ops of an ONNX graph are not standard ONNX (the default `ai.onnx` domain): TensorRT's ONNX
parser knows the standard ops only, so a graph with onnxruntime's com.microsoft contrib ops (the
fused GroupQueryAttention, SkipLayerNorm, ...) fails to parse."""
from __future__ import annotations

from pathlib import Path

STANDARD_DOMAINS = ("", "ai.onnx")


def standard_ops_check(onnx_path: str | Path) -> list[str]:
    """'domain::OpType' of every non-standard op in the graph at `onnx_path` (sorted, each once);
    empty when every node is a standard ONNX op. Nodes inside subgraphs (If, Loop, Scan) count, and a
    call of one of the model's own functions counts as the ops of its body."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    functions = {(f.domain, f.name): f for f in model.functions}
    found: set[str] = set()
    seen: set[tuple[str, str]] = set()

    def visit(nodes):
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in functions:
                if key not in seen:
                    seen.add(key)
                    visit(functions[key].node)
            elif node.domain not in STANDARD_DOMAINS:
                found.add(f"{node.domain}::{node.op_type}")
            for attribute in node.attribute:
                for graph in [attribute.g, *attribute.graphs] if attribute.HasField("g") else attribute.graphs:
                    visit(graph.node)

    visit(model.graph.node)
    return sorted(found)
