"""Running a TensorRT engine of `ulsexport engine` (`--runtime tensorrt`, artifact kind "tensorrt"):
greedy decoding through an execution context, with the concat KV cache of the standard-ops export.

Each pass sets every input's shape and every tensor's address (torch CUDA tensors), runs
`execute_async_v3` on a torch stream and waits for it; the presents become the next pass's pasts.
Batches come left-padded, as Hugging Face pads them; attention_mask grows by one column a step and
position_ids are computed from it the way `ulsexport.runtime.ort` computes them. A batch runs in
the smallest optimization profile that holds it.

Not executed in this project's environment: no CPU runs engines, and the H200 the project has
(compute capability 9.0) runs no TensorRT-for-RTX engine while full TensorRT is not installable
there. The shape bookkeeping (`pick_profile`, `pass_shapes`) is plain Python and unit-tested.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifact import Artifact, artifact_path
from ..errors import UserError, first_line
from .base import Runtime
from .ort_streams import position_ids_for


def pick_profile(profiles: list[dict], batch: int, total: int, new: int) -> int:
    """Index of the smallest profile that holds a pass of `batch` rows, `new` tokens each, over a
    past of `total - new` positions; a one-line refusal where none does."""
    for index, profile in enumerate(profiles):
        ids_max, mask_max = profile["input_ids"]["max"], profile["attention_mask"]["max"]
        if batch <= ids_max[0] and new <= ids_max[1] and total <= mask_max[1]:
            return index
    largest = profiles[-1]
    raise UserError(f"a pass of batch {batch} over {total} positions passes the engine's profiles "
                    f"(batch up to {largest['input_ids']['max'][0]}, {largest['attention_mask']['max'][1]} positions); "
                    "rebuild with a larger --batch or --max-seq")


def pass_shapes(onnx: dict, batch: int, new: int, past: int) -> dict[str, tuple[int, ...]]:
    """Every input's and output's shape in a pass of `batch` rows, `new` tokens each, over `past`
    cached positions (the dims the export names; fixed dims as exported)."""
    dims = {"batch": batch, "sequence_length": new, "past_sequence_length": past,
            "total_sequence_length": past + new, "past_sequence_length + sequence_length": past + new}
    shapes = {}
    for name, shape in onnx["io_shapes"].items():
        try:
            shapes[name] = tuple(d if isinstance(d, int) else dims[d] for d in shape)
        except KeyError as exc:
            raise UserError(f"{name} has a dim {exc} the TensorRT runtime does not know") from None
    return shapes


class TensorrtRuntime(Runtime):
    """An engine folder (model.plan + ulsexport.json of kind tensorrt) on a CUDA device."""

    name = "tensorrt"

    def __init__(self, folder: str | Path, device: str = "cuda", trt_module=None):
        import torch

        from ..engine.library import load_library

        folder = Path(folder)
        manifest = Artifact.open(folder).manifest
        if manifest.get("kind") != "tensorrt":
            raise UserError(f"{folder} has no TensorRT engine manifest (ulsexport.json of kind 'tensorrt')")
        if not str(device).startswith("cuda") or not torch.cuda.is_available():
            raise UserError("--runtime tensorrt runs on a CUDA GPU only (--device cuda)")
        self.onnx, self.engine_facts = manifest["onnx"], manifest["engine"]
        self.profiles = self.engine_facts["profiles"]
        self.cache_inputs = [n for pair in self.onnx["cache_inputs"] for n in pair]
        self.cache_outputs = [n for pair in self.onnx["cache_outputs"] for n in pair]
        self.uses_position_ids = "position_ids" in self.onnx["inputs"]
        self.device = torch.device(device)
        lib, trt = load_library(self.engine_facts["library"], trt_module)
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(artifact_path(folder, self.engine_facts.get("file"), "engine.file").read_bytes())
        if self.engine is None:
            major, minor = torch.cuda.get_device_capability(self.device)
            raise UserError(f"{lib.title} could not load {self.engine_facts['file']} on {torch.cuda.get_device_name()} "
                            f"(compute capability {major}.{minor}); its engines run on {lib.runs_on_note}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self.profile = None
        self.dtypes = {name: self._torch_dtype(self.engine.get_tensor_dtype(name))
                       for name in [*self.onnx["inputs"], *self.cache_inputs, "logits", *self.cache_outputs]}

    @classmethod
    def open(cls, folder: str | Path, dtype: str | None = None, device: str = "cuda") -> TensorrtRuntime:
        runtime = cls(folder, device)
        graph = runtime.onnx["dtype"]
        if dtype is not None and dtype != graph:
            raise UserError(f"{folder} is an engine of a {graph} graph; --runtime tensorrt takes and returns "
                            f"{graph}, not {dtype}")
        return runtime

    @staticmethod
    def _torch_dtype(trt_dtype):
        import torch

        name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
        table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                 "INT32": torch.int32, "BOOL": torch.bool, "INT8": torch.int8}
        if name not in table:
            raise UserError(f"the engine has a tensor of type {name}, which --runtime tensorrt does not bind")
        return table[name]

    def prefill(self, input_ids, attention_mask, max_new_tokens: int):
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        limit = self.engine_facts["max_sequence_length"]
        if mask.shape[1] + max_new_tokens > limit:
            raise UserError(f"{mask.shape[1]} prompt + {max_new_tokens} new tokens pass the engine's {limit} positions")
        state = EngineStream(self, ids, mask)
        return state, state.forward(None)

    def step(self, state, next_ids):
        return state.forward(np.asarray(next_ids))

    def run_pass(self, feeds: dict, past: list) -> tuple:
        """One pass: (logits [batch, new, vocab] on the GPU, presents). `feeds` holds input_ids,
        attention_mask (and position_ids) as numpy; `past` the cache tensors on the GPU."""
        import torch

        batch, new = feeds["input_ids"].shape
        total = feeds["attention_mask"].shape[1]
        index = pick_profile(self.profiles, batch, total, new)
        if index != self.profile:
            self.context.set_optimization_profile_async(index, self.stream.cuda_stream)
            self.profile = index
        shapes = pass_shapes(self.onnx, batch, new, total - new)
        keep = []  # the tensors bound in this pass live until it has run
        for name, array in feeds.items():
            tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device, self.dtypes[name])
            keep.append(self._bind_input(name, tensor))
        for name, tensor in zip(self.cache_inputs, past):
            keep.append(self._bind_input(name, tensor))
        outputs = {}
        for name in ["logits", *self.cache_outputs]:
            shape = tuple(self.context.get_tensor_shape(name))
            if shape != shapes[name]:
                raise UserError(f"the engine gives {name} the shape {shape}, not the expected {shapes[name]}")
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, self._address(outputs[name]))
        torch.cuda.current_stream(self.device).synchronize()  # the inputs' copies are on the default stream
        try:
            ok = self.context.execute_async_v3(self.stream.cuda_stream)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"the engine failed to run: {first_line(exc)}") from None
        if not ok:
            raise UserError("the engine failed to run (execute_async_v3 returned false; its log says why)")
        self.stream.synchronize()
        del keep
        return outputs["logits"], [outputs[n] for n in self.cache_outputs]

    def _bind_input(self, name, tensor):
        self.context.set_input_shape(name, tuple(tensor.shape))
        self.context.set_tensor_address(name, self._address(tensor))
        return tensor

    def _address(self, tensor) -> int:
        """A tensor's device address; an empty tensor (the first pass's past) gets a real one-element
        buffer's, since TensorRT wants a valid address for every bound tensor."""
        if tensor.numel():
            return tensor.data_ptr()
        if getattr(self, "_empty", None) is None:
            import torch

            self._empty = torch.zeros(16, dtype=torch.uint8, device=self.device)
        return self._empty.data_ptr()


class EngineStream:
    """Left-padded rows; each pass's presents become the next pass's pasts."""

    def __init__(self, runtime: TensorrtRuntime, input_ids: np.ndarray, attention_mask: np.ndarray):
        import torch

        self.runtime, self.ids, self.mask = runtime, input_ids, attention_mask
        onnx = runtime.onnx
        empty = (len(input_ids), onnx["num_kv_heads"], 0, onnx["head_dim"])
        self.cache = [torch.zeros(empty, dtype=runtime.dtypes[n], device=runtime.device) for n in runtime.cache_inputs]

    def forward(self, next_ids: np.ndarray | None) -> np.ndarray:
        """The prompt (first call) or the tokens just chosen: one pass; the last position's logits."""
        if next_ids is not None:
            self.ids = next_ids[:, None]
            self.mask = np.concatenate([self.mask, np.ones_like(self.mask[:, :1])], axis=1)
        feeds = step_feeds(self.ids, self.mask, self.runtime.uses_position_ids)
        logits, self.cache = self.runtime.run_pass(feeds, self.cache)
        return logits[:, -1].cpu().numpy()


def step_feeds(ids: np.ndarray, mask: np.ndarray, uses_position_ids: bool) -> dict[str, np.ndarray]:
    """The non-cache inputs of a pass: the new tokens, the mask over past and new, their positions."""
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
    if uses_position_ids:
        feeds["position_ids"] = position_ids_for(mask, ids.shape[1])
    return feeds
