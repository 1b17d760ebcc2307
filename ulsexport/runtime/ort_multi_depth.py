"""Several depths of one multi-depth export (`ulsexport onnx --speedups`) over one copy of its weights: the
weights file held once (`SharedWeights`), one `OnnxDecoder` per depth, and the checks of its files."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifact import Artifact, artifact_path
from ..errors import UserError
from .base import Runtime
from .ort_decoder import OnnxDecoder


class SharedWeights:
    """A multi-depth export's weights file, held once in memory (host for the CPU, device for CUDA) as
    OrtValues that every depth's session takes (`SessionOptions.add_initializer`): no session loads
    or copies its own. onnxruntime accepts only memory the caller owns for a CUDA initializer, so
    device tensors are torch's, wrapped through DLPack."""

    def __init__(self, folder: Path, manifest: dict, provider: str):
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype

        self.file, graph_files = multi_depth_files(folder, manifest)
        self.provider = provider
        self.arrays: dict[str, np.ndarray] = {}
        self.names: dict[str, list[str]] = {}      # graph file -> the shared initializers it names
        data = np.memmap(self.file, dtype=np.uint8, mode="r")
        for graph in manifest["graphs"]:
            proto = onnx.load(str(graph_files[graph["tag"]]), load_external_data=False)
            names = []
            for tensor in proto.graph.initializer:
                info = {e.key: e.value for e in tensor.external_data}
                if info.get("location") != self.file.name:
                    continue
                names.append(tensor.name)
                if tensor.name not in self.arrays:
                    self.arrays[tensor.name] = self._array(data, tensor, info, graph["file"], tensor_dtype_to_np_dtype)
            self.names[graph["file"]] = names
        self.device_tensors = []
        self.values = {name: self._value(array) for name, array in self.arrays.items()}

    def _array(self, data: np.memmap, tensor, info: dict, graph_file: str, np_dtype) -> np.ndarray:
        """The tensor's bytes in the weights file, viewed as its dtype and shape; refused in one line
        where the graph's offsets or sizes do not fit the file (a truncated or foreign weights file)."""
        try:
            start, length = int(info.get("offset", 0)), int(info["length"])
            dtype = np.dtype(np_dtype(tensor.data_type))
            fits = 0 <= start and start + length <= data.size and length == dtype.itemsize * int(np.prod(tensor.dims))
        except (KeyError, ValueError, TypeError):
            fits = False
        if not fits:
            raise UserError(f"{graph_file}: the weight {tensor.name} does not fit {self.file.name} ({data.size} bytes; "
                            "truncated, or from another export); rebuild it with `ulsexport onnx --speedups ...`")
        return data[start:start + length].view(dtype).reshape(tuple(tensor.dims))

    def _value(self, array: np.ndarray):
        import onnxruntime as ort

        if self.provider == "cpu":
            return ort.OrtValue.ortvalue_from_numpy(np.array(array))  # one host copy, shared by every session
        import torch
        from onnxruntime.capi._pybind_state import OrtValue as C_OrtValue

        tensor = torch.from_numpy(np.array(array)).cuda()
        self.device_tensors.append(tensor)  # the OrtValue borrows this memory
        capsule = torch.utils.dlpack.to_dlpack(tensor)
        try:  # onnxruntime 1.31 takes (capsule, is_bool_tensor); older ones the capsule alone
            value = C_OrtValue.from_dlpack(capsule, False)
        except TypeError:
            value = C_OrtValue.from_dlpack(capsule)
        return ort.OrtValue(value)  # add_initializer takes the Python OrtValue, not the C one

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def session_factory(self, graph_file: str):
        """make(model, options, providers) that hands the graph its shared initializers."""
        import onnxruntime as ort

        def make(model, options, providers):
            options.add_session_config_entry("session.disable_prepacking", "1")  # prepacking copies weights
            for name in self.names[graph_file]:
                options.add_initializer(name, self.values[name])
            return ort.InferenceSession(model, options, providers=providers)

        return make


def multi_depth_files(folder: Path, manifest: dict) -> tuple[Path, dict[str, Path]]:
    """The weights file and each depth's graph file (by tag) of a multi-depth export, checked first: every
    graph with its tag, file, kept layers and onnx section, the default among them, every file inside the
    folder, present, and the weights file as long as the manifest says; else one line naming what is wrong."""
    folder = Path(folder)
    rebuild = "rebuild it with `ulsexport onnx --speedups ...`"
    graphs, weights = manifest.get("graphs"), manifest.get("weights")
    if not isinstance(graphs, list) or not graphs or not isinstance(weights, dict):
        raise UserError(f"{folder}: its multi-depth manifest lists no graphs or no weights; {rebuild}")
    for i, graph in enumerate(graphs):
        missing = [key for key, kind in (("tag", str), ("file", str), ("kept", list), ("onnx", dict))
                   if not isinstance(graph, dict) or not isinstance(graph.get(key), kind)]
        if missing:
            raise UserError(f"{folder}: graph {i + 1} of its manifest has no {' or '.join(missing)}; {rebuild}")
    tags = [g["tag"] for g in graphs]
    if len(set(tags)) != len(tags) or manifest.get("default_graph") not in tags:
        raise UserError(f"{folder}: its manifest's depths {tags} repeat a tag or lack the default graph "
                        f"{manifest.get('default_graph')!r}; {rebuild}")
    weights_file = artifact_path(folder, weights.get("file"), "weights.file")
    files = {g["tag"]: artifact_path(folder, g["file"], f"the graph file of depth {g['tag']}") for g in graphs}
    for path in (weights_file, *files.values()):
        if not path.is_file() or path.stat().st_size == 0:
            raise UserError(f"{folder}: {path.name} is {'empty' if path.is_file() else 'missing'}; the export is "
                            f"incomplete: {rebuild}")
    size, expected = weights_file.stat().st_size, weights.get("bytes")
    if isinstance(expected, int) and size != expected:
        raise UserError(f"{folder}: {weights_file.name} holds {size} bytes, its manifest says {expected} "
                        f"(truncated or replaced); {rebuild}")
    return weights_file, files


class DepthState:
    def __init__(self, decoder: OnnxDecoder, inner):
        self.decoder, self.inner = decoder, inner


class MultiDepthDecoder(Runtime):
    """Every depth of a multi-depth export, over one copy of its weights; `depth` picks the graph per
    call ("full", "2x", ...; the manifest's default graph when left out)."""

    name = "ort"

    def __init__(self, folder: str | Path, provider: str = "cpu", **decoder_options):
        folder = Path(folder)
        artifact = Artifact.open(folder)
        manifest = artifact.manifest
        if not artifact.multi_depth:
            raise UserError(f"{folder} is not a multi-depth export (ulsexport onnx --speedups ...)")
        if decoder_options.get("decode_kernels"):  # each depth's session would fold a transposed copy of its own
            raise UserError("ulsexport's decode kernels do not run multi-depth exports: their weights are held once, "
                            "and each depth would keep its own transposed copy")
        self.weights = SharedWeights(folder, manifest, provider)
        self.default = manifest["default_graph"]
        self.decoders = {g["tag"]: OnnxDecoder(folder, provider, graph=g["tag"],
                                               session=self.weights.session_factory(g["file"]), **decoder_options)
                         for g in manifest["graphs"]}
        self.onnx = self.decoders[self.default].onnx
        self.depths = list(self.decoders)
        self.kept = {g["tag"]: g["kept"] for g in manifest["graphs"]}
        self.queued_steps = min(d.queued_steps for d in self.decoders.values())  # every depth can queue as many

    def decoder(self, depth: str | None = None) -> OnnxDecoder:
        depth = depth or self.default
        if depth not in self.decoders:
            raise UserError(f"no depth '{depth}' in this export; it has: {', '.join(self.decoders)}")
        return self.decoders[depth]

    def prefill(self, input_ids, attention_mask, max_new_tokens: int, depth: str | None = None,
                prefill_depth: str | None = None):
        """The prompt through `prefill_depth`'s graph (default: `depth`'s), decoding then through `depth`'s.

        With `prefill_depth="full"` this is the ULS authors' scheme: the prompt runs through every layer
        and only the generated tokens skip; the decoding graph continues from the prompt's cache of the
        layers it keeps (the same buffers, no copy, in the shared layout), and the first new token comes
        from the prefill graph's logits."""
        decoder = self.decoder(depth)
        if prefill_depth is None or prefill_depth == (depth or self.default):
            inner, logits = decoder.prefill(input_ids, attention_mask, max_new_tokens)
            return DepthState(decoder, inner), logits
        first = self.decoder(prefill_depth)
        prompt, logits = first.prefill(input_ids, attention_mask, max_new_tokens)
        index = {layer: i for i, layer in enumerate(self.kept[prefill_depth])}
        missing = [layer for layer in self.kept[depth or self.default] if layer not in index]
        if missing:
            raise UserError(f"the prefill depth '{prefill_depth}' lacks layers {missing} that '{depth}' decodes with")
        cache = [prompt.cache[2 * index[layer] + part] for layer in self.kept[depth or self.default] for part in (0, 1)]
        return DepthState(decoder, decoder.stream(input_ids, attention_mask, max_new_tokens, cache)), logits

    def step(self, state: DepthState, next_ids):
        return state.decoder.step(state.inner, next_ids)

    def decode(self, state: DepthState, next_ids, steps: int):
        return state.decoder.decode(state.inner, next_ids, steps)
