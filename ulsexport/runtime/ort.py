"""onnxruntime, as the runtime registry's `ort` entry and the one import path for callers: an exported
decoder (`OnnxDecoder`, ort_decoder.py, the runner), several depths over one weights file
(`MultiDepthDecoder`, ort_multi_depth.py), the decoding streams of the two cache layouts (ort_streams.py) and
the sessions they run (ort_session.py, the loader). Imports point one way: this module -> multi-depth ->
decoder -> streams, session -> base."""
from __future__ import annotations

from pathlib import Path

from ..artifact import Artifact
from ..errors import UserError
from .base import Runtime
from .ort_decoder import CAPACITY_STEP, QUEUED_STEPS, OnnxDecoder, graph_section
from .ort_multi_depth import DepthState, MultiDepthDecoder, SharedWeights, multi_depth_files
from .ort_session import (NEXT_MASK, NEXT_TOKEN, NUMPY_DTYPES, PROVIDERS, add_next_inputs, nodes_off_cuda,
                          placements_off_cuda, session_graph, session_options)
from .ort_streams import ConcatCacheStream, SharedCacheStream, StepBuffers, StepLogits, position_ids_for


class OrtRuntime:
    """The registry's `ort` entry: `open` gives the runtime over an export."""

    @staticmethod
    def open(folder: str | Path, dtype: str | None = None, device: str = "cpu", **options) -> Runtime:
        """An OnnxDecoder, or a MultiDepthDecoder for a multi-depth export; `options` are the decoder's
        (`cuda_graph` None captures decode steps where it can: CUDA, shared cache; False never; True or refuse)."""
        options = {k: v for k, v in options.items() if v is not None}
        decoder = MultiDepthDecoder(folder, device, **options) if Artifact.open(folder).multi_depth \
            else OnnxDecoder(folder, device, **options)
        if dtype is not None and dtype != decoder.onnx["dtype"]:
            raise UserError(f"{folder} is a {decoder.onnx['dtype']} export; --runtime ort runs it in "
                            f"{decoder.onnx['dtype']}, not {dtype}")
        return decoder


__all__ = ["CAPACITY_STEP", "NEXT_MASK", "NEXT_TOKEN", "NUMPY_DTYPES", "PROVIDERS", "QUEUED_STEPS", "ConcatCacheStream",
           "DepthState", "MultiDepthDecoder", "OnnxDecoder", "OrtRuntime", "SharedCacheStream", "SharedWeights",
           "StepBuffers", "StepLogits", "add_next_inputs", "graph_section", "multi_depth_files", "nodes_off_cuda",
           "placements_off_cuda", "position_ids_for", "session_graph", "session_options"]
