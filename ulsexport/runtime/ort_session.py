"""Making onnxruntime sessions over an exported graph (the loader): the providers, the session options,
the graph a session loads (as exported, or with the next step's inputs made in the graph and ulsexport's
decode kernels), and which nodes a session left off the CUDA provider."""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from ..errors import UserError, first_line
from . import kernels

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}

NEXT_TOKEN = "ulsexport_next_token"  # outputs the fixed-width session adds: each position's greedy id,
NEXT_MASK = "ulsexport_next_mask"    # and the attention mask of the next step


def session_graph(path: str, next_inputs: bool, decode_kernels: bool = False) -> str | bytes:
    """What a session loads: the graph at `path` as it is, or (weights left in their files, the files
    untouched) with the next step's inputs made in the graph (`add_next_inputs`) and its MatMuls by fp16
    weights on ulsexport's decode kernels (`kernels.use_decode_matmul`)."""
    if not (next_inputs or decode_kernels):
        return path
    import onnx

    model = onnx.load(path, load_external_data=False)
    if next_inputs:
        add_next_inputs(model.graph)
    if decode_kernels and not kernels.use_decode_matmul(model):
        raise UserError(f"{path} has no MatMul by an fp16 weight for ulsexport's decode kernels to run "
                        "(they take fp16 exports)")
    return model.SerializeToString()


def add_next_inputs(graph) -> None:
    """Two more outputs of `graph`, so that a decode step makes the next one's inputs where it runs and only
    the chosen ids come back to the host:

    - NEXT_TOKEN, the argmax of the logits over the vocabulary (ArgMax keeps the first of equal maxima, as
      numpy does);
    - NEXT_MASK, the attention mask one column longer per row: rows are right-padded (each row's ones
      first, at least one), so that is the mask shifted right by one behind its own first column, its
      width kept (Slice and Concat: copies of any type on every provider)."""
    from onnx import TensorProto, helper, numpy_helper

    def name(part: str) -> str:
        return f"{NEXT_MASK}.{part}"

    constants = {"zero": [0], "one": [1], "last": [-1]}
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), name(k)) for k, v in constants.items())
    graph.node.extend([
        helper.make_node("ArgMax", ["logits"], [NEXT_TOKEN], name=NEXT_TOKEN, axis=-1, keepdims=0),
        helper.make_node("Slice", ["attention_mask", name("zero"), name("one"), name("one")], [name("first")],
                         name=name("first")),
        helper.make_node("Concat", [name("first"), "attention_mask"], [name("longer")], name=name("longer"), axis=1),
        helper.make_node("Slice", [name("longer"), name("zero"), name("last"), name("one")], [NEXT_MASK],
                         name=NEXT_MASK)])
    graph.output.extend([helper.make_tensor_value_info(NEXT_TOKEN, TensorProto.INT64, None),
                         helper.make_tensor_value_info(NEXT_MASK, TensorProto.INT64, None)])


def session_options(model: str | bytes, folder: Path, severity: int = 3, library: Path | None = None):
    """Options of a session over `model`, a path or a graph in memory whose external weights are in `folder`;
    `library`, a custom-op library to register (ulsexport's kernels)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = severity  # 3, errors only: the exporter's shape annotations draw warnings
    if isinstance(model, bytes):
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    if library is not None:
        try:
            options.register_custom_ops_library(str(library))
        except Exception as exc:  # not a library, built for another onnxruntime, a CUDA library missing
            raise UserError(f"onnxruntime could not load the kernels library {library}: {first_line(exc)}") from None
    return options


def nodes_off_cuda(model: str | bytes, folder: Path, library: Path | None = None) -> list[str]:
    """'OpType (node name)' of each node onnxruntime places on another provider than CUDA, read from
    its verbose placement log (written to the process's stderr, so fd 2 is redirected meanwhile)."""
    import onnxruntime as ort

    options = session_options(model, folder, severity=0, library=library)  # the placements are logged at VERBOSE
    with tempfile.TemporaryFile(mode="w+") as log:
        saved = os.dup(2)
        try:
            os.dup2(log.fileno(), 2)
            with contextlib.suppress(Exception):
                ort.InferenceSession(model, options, providers=PROVIDERS["cuda"])
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        return placements_off_cuda(log.read())


PLACED = re.compile(r"(Node\(s\)|All nodes) placed on \[(\w+)\]\. Number of nodes: (\d+)")
PLACED_NODE = re.compile(r"(?:VerifyEachNodeIsAssignedToAnEp\]|^)\s{2,}(\S+ \(.*\))\s*$")


def placements_off_cuda(log: str) -> list[str]:
    """The nodes that onnxruntime's placement log ('Node(s) placed on [EP]. Number of nodes: N', then a
    line per node; 'All nodes placed on [EP]' when one provider takes them all) puts off CUDA."""
    nodes, provider = [], None
    for line in log.splitlines():
        if header := PLACED.search(line):
            provider = header.group(2)
            if header.group(1) == "All nodes" and provider != "CUDAExecutionProvider":
                nodes.append(f"all {header.group(3)} nodes ({provider})")
        elif provider not in (None, "CUDAExecutionProvider") and (node := PLACED_NODE.search(line)):
            nodes.append(node.group(1))
    return nodes
