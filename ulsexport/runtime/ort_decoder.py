"""Running an exported ONNX decoder (the runner): an onnxruntime session and a greedy loop over its KV cache.

Callers pass batches left-padded, as Hugging Face pads them. The cache is kept as the export's
manifest says (`onnx.kv_cache`):

- "concat": `present.{i}.*` is fed back as `past_key_values.{i}.*`; `attention_mask` and
  `position_ids` are computed for the left-padded batch the way `generate` does. With `io_binding`
  the cache stays where the execution provider put it (on the GPU for CUDA) between steps instead
  of round-tripping through numpy.
- "shared": one buffer per cache tensor, as long as the prompt plus the new tokens, is bound as
  both past and present once; the graph appends to it at each row's length. Rows are moved to the
  right-padded layout that graph takes, and each row's next token is read at its own last position.

Fixed-width decode (shared cache; the default on CUDA): every decode step of a (batch, capacity)
reads and writes the same buffers, kept by the decoder across calls: token ids, an attention mask
as wide as the cache buffer (its shape never changes; each step sets one more column per row), the
cache and the logits. That is what a CUDA graph needs: with `cuda_graph`, onnxruntime captures the
first decode step of each (batch, capacity) (`gpu_graph_id`) and replays it after, while the prompt
runs uncaptured (`gpu_graph_id` -1), so any batch size works. Batches are rounded up to a power of
two and capacities to CAPACITY_STEP, so that few graphs serve all calls; the extra rows (one token
each) are run and dropped. A graph with a node that is not on the CUDA provider cannot be captured:
the decoder then runs uncaptured and says which nodes (`cuda_graph_off`).

The fixed-width session runs the graph with two outputs added (`add_next_inputs`, in memory;
the export's files are not touched): the argmax of the logits and the next step's attention mask,
written into the buffers the next step reads. So a step's greedy ids are chosen where the logits are,
only they come back to the host (a step returns a `StepLogits`; its logits are copied only when asked
for), and nothing goes up between steps unless the caller feeds other ids than those chosen.

As no step then waits for the host, `decode` queues up to `queued_steps` captured steps back to back
(onnxruntime's run returns at the graph's launch, `disable_synchronize_execution_providers`; the last
one waits) and reads their ids together: the GPU runs step after step while the host launches the
next, instead of idling while the host reads each step's ids and calls onnxruntime again. Each queued
step writes its ids and mask into buffers of its own (one phase each, a captured graph each), so that
none is overwritten before it is read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifact import Artifact, artifact_path
from ..errors import UserError, first_line
from . import kernels
from .base import Runtime
from .ort_session import (NEXT_MASK, NEXT_TOKEN, NUMPY_DTYPES, PROVIDERS, nodes_off_cuda, session_graph,
                          session_options)
from .ort_streams import ConcatCacheStream, SharedCacheStream, StepBuffers, VerifyBuffers

CAPACITY_STEP = 256  # fixed-width cache buffers are rounded up to this, so that calls share captured graphs
QUEUED_STEPS = 8  # captured decode steps queued before their ids are read: the host's time per step / 8
VERIFY_GRAPHS = 1 << 16  # graph ids of verify passes start here, past any decode step's


class OnnxDecoder(Runtime):
    """An exported decoder folder (model.onnx + ulsexport.json) loaded in onnxruntime.

    `session` is an InferenceSession already made over the folder's graph (e.g. with profiling
    options), or a factory `session(model, options, providers)`; by default one is made here.
    `cuda_graph` (shared cache on CUDA; default on there) captures decode steps; `fixed_width`
    (default: where capturing) runs the fixed-width decode loop without capturing, as on the CPU;
    `device_argmax` False leaves the fixed-width step's argmax to the host; `queued_steps` (default
    QUEUED_STEPS where steps are captured and choose their own ids, else 1) bounds the steps `decode`
    queues; `decode_kernels` (CUDA) runs the graph's products by fp16 weights on ulsexport's own kernels
    (`kernels.use_decode_matmul`; the session then folds a transposed copy of those weights on the host
    at load, instead of the file's layout). A factory gets the model as a path or, with the argmax added,
    as bytes (their options name the folder of the external weights).
    """

    name = "ort"

    def __init__(self, folder: str | Path, provider: str = "cpu", io_binding: bool | None = None, session=None,
                 cuda_graph: bool | None = None, fixed_width: bool | None = None, graph: str | None = None,
                 device_argmax: bool = True, queued_steps: int | None = None, decode_kernels: bool = False):
        import onnxruntime as ort

        folder = Path(folder)
        manifest = Artifact.open(folder).manifest
        if manifest.get("kind") != "onnx":
            raise UserError(f"{folder} has no ONNX export manifest (ulsexport.json of kind 'onnx')")
        if provider not in PROVIDERS:
            raise UserError(f"unknown provider '{provider}'; choose one of {', '.join(PROVIDERS)}")
        if decode_kernels and provider != "cuda":
            raise UserError("ulsexport's decode kernels run on CUDA only (--device cuda)")
        if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError("CUDAExecutionProvider is not available (install onnxruntime-gpu)")
        self.onnx = graph_section(manifest, graph)
        self.device = provider
        self.shared_cache = self.onnx.get("kv_cache") == "shared"
        if cuda_graph and not (provider == "cuda" and self.shared_cache):
            raise UserError("CUDA graph decoding needs --device cuda and an export with the shared KV cache "
                            f"(this one: {provider}, {self.onnx.get('kv_cache', 'concat')} cache)")
        self.cuda_graph = provider == "cuda" and self.shared_cache if cuda_graph is None else cuda_graph
        self.cuda_graph_off = None  # why capture was asked for and is not used
        self.device_argmax_off = None  # why the graph does not choose the ids where it could
        self.fixed_width = self.shared_cache and (self.cuda_graph if fixed_width is None else fixed_width)
        self.library = kernels.library() if decode_kernels else None  # the custom-op library each session registers
        path = str(artifact_path(folder, self.onnx.get("file"), "onnx.file" + (f" of depth {graph}" if graph else "")))
        if session is None or not hasattr(session, "run_with_iobinding"):  # none, or a factory
            make = session or ort.InferenceSession
            try:
                model = session_graph(path, self.fixed_width and device_argmax, decode_kernels)
            except ImportError:  # a lean environment (a Triton stub's, say) without the onnx package
                if decode_kernels:
                    raise UserError("ulsexport's decode kernels need the onnx package (pip install onnx)") from None
                self.device_argmax_off = "the onnx package is not installed: the host takes the argmax"
                model = path
            session = self._captured_session(make, model, folder) if self.cuda_graph else None
            if session is None and self.fixed_width and fixed_width is None:  # capture refused: the plain loop
                self.fixed_width, model = False, session_graph(path, False, decode_kernels)
            session = session or make(model, self.session_options(model, folder), providers=PROVIDERS[provider])
        if provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
            # onnxruntime falls back to the CPU, with a warning only, when the CUDA libraries fail to load
            raise UserError(f"onnxruntime could not start its CUDA provider for {path} (it runs on "
                            f"{', '.join(session.get_providers())}): the CUDA and cuDNN libraries that "
                            f"onnxruntime-gpu {ort.__version__} needs were not found (LD_LIBRARY_PATH)")
        self.session = session
        # the fixed-width step's greedy ids come from the graph's own argmax where the session has it
        self.device_argmax = self.fixed_width and NEXT_TOKEN in {o.name for o in session.get_outputs()}
        if queued_steps is None:
            queued_steps = QUEUED_STEPS if self.device_argmax and self.cuda_graph else 1
        if queued_steps < 1:
            raise UserError(f"queued_steps must be at least 1 (got {queued_steps})")
        if queued_steps > 1 and not self.device_argmax:
            raise UserError("queued decode steps need the fixed-width step that chooses its own ids")
        self.queued_steps = queued_steps
        self.phases = max(2, queued_steps + 1) if self.device_argmax else 1  # of each step's buffers
        self._run_options: dict[tuple[int, bool], object] = {}
        self._step_buffers: dict[tuple[int, int], StepBuffers] = {}
        self._verify_buffers: dict[tuple[int, int, int], VerifyBuffers] = {}
        self.verify_capture_off = None  # why verify passes run uncaptured where decode steps are captured
        # the shared buffer is bound as input and output at once: that needs io binding, on any provider
        self.io_binding = self.shared_cache or (provider == "cuda" if io_binding is None else io_binding)
        self.cache_inputs = [n for pair in self.onnx["cache_inputs"] for n in pair]
        self.cache_outputs = [n for pair in self.onnx["cache_outputs"] for n in pair]
        self.uses_position_ids = "position_ids" in self.onnx["inputs"]
        self.dtype = NUMPY_DTYPES[self.onnx["dtype"]]

    def prefill(self, input_ids, attention_mask, max_new_tokens: int, plain: bool = False):
        """The prompt's pass; the logits come back to the host, so the step has finished. `plain`: decode
        with the plain loop even where this decoder has the fixed-width step (several tokens per pass and
        rollbacks, as speculative decoding needs, run only there)."""
        stream = self.stream(input_ids, attention_mask, max_new_tokens, plain=plain)
        return stream, stream.forward(None)

    def stream(self, input_ids, attention_mask, max_new_tokens: int, cache=None, plain: bool = False):
        """A decoding stream over this graph; `cache` (one value per cache input) continues from a prompt
        another graph ran, its first forward being a decode step."""
        if not self.shared_cache:
            return ConcatCacheStream(self, np.asarray(input_ids), np.asarray(attention_mask), max_new_tokens, cache)
        return SharedCacheStream(self, np.asarray(input_ids), np.asarray(attention_mask), max_new_tokens, cache,
                                 plain=plain)

    def step(self, state, next_ids):
        return state.forward(np.asarray(next_ids))

    def _captured_session(self, make, model: str | bytes, folder: Path):
        """A session that can capture CUDA graphs, or None (and `cuda_graph_off` says why)."""
        providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), "CPUExecutionProvider"]
        try:
            return make(model, self.session_options(model, folder), providers=providers)
        except Exception as exc:  # onnxruntime refuses capture when a node is not on the CUDA provider
            off_cuda = nodes_off_cuda(model, folder, self.library)
            self.cuda_graph_off = (f"not on the CUDA provider: {', '.join(off_cuda)}" if off_cuda
                                   else first_line(exc))
            self.cuda_graph = False
            return None

    def session_options(self, model: str | bytes, folder: Path):
        return session_options(model, folder, library=self.library)

    def run_options(self, graph_id: int, wait: bool = True):
        """Run options naming the CUDA graph of a step (-1: run uncaptured), or None without capture;
        with `wait` False the run returns once the graph is launched."""
        if not self.cuda_graph:
            return None
        if (graph_id, wait) not in self._run_options:
            import onnxruntime as ort

            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
            options.add_run_config_entry("disable_synchronize_execution_providers", "0" if wait else "1")
            self._run_options[graph_id, wait] = options
        return self._run_options[graph_id, wait]

    def decode(self, state, next_ids, steps: int) -> list[np.ndarray]:
        if not (self.device_argmax and getattr(state, "fixed_width", False)):
            return super().decode(state, next_ids, steps)
        return state.decode(np.asarray(next_ids), steps)

    def capacity_for(self, length: int) -> int:
        """The fixed-width cache length that holds `length` positions: rounded up, so that calls of
        similar lengths share one captured graph, and never past the export's positions."""
        limit = self.onnx.get("max_sequence_length") or length
        return min(-(-length // CAPACITY_STEP) * CAPACITY_STEP, limit)

    @staticmethod
    def rows_for(batch: int) -> int:
        """The batch a fixed-width step runs: rounded up to a power of two, so that batches of nearby
        sizes (a server's, say) share one captured graph."""
        return 1 << (batch - 1).bit_length()

    def step_buffers(self, batch: int, capacity: int) -> StepBuffers:
        """The buffers of the (batch, capacity) decode step, made and bound on first use: with the graph's
        own next inputs, a ring of phases, each reading one set of ids and mask and writing the next
        phase's (onnxruntime runs a graph two or three times in the call that captures it, so no run may
        overwrite what it reads; and `queued_steps` steps' ids must all be there when they are read),
        each its own captured graph; else one phase, its inputs uploaded at every step."""
        key = (batch, capacity)
        if key not in self._step_buffers:
            vocab = self.onnx["io_shapes"]["logits"][-1]
            phases = self.phases
            buffers = StepBuffers(
                cache=[self.to_device(np.zeros(self.cache_shape(batch, capacity), self.dtype))
                       for _ in self.cache_inputs],
                ids=[self.to_device(np.zeros((batch, 1), np.int64)) for _ in range(phases)],
                mask=[self.to_device(np.zeros((batch, capacity), np.int64)) for _ in range(phases)],
                logits=self.to_device(np.zeros((batch, 1, vocab), self.dtype)),
                bindings=[self.session.io_binding() for _ in range(phases)],
                graph_ids=[phases * len(self._step_buffers) + 1 + phase for phase in range(phases)])
            for phase, binding in enumerate(buffers.bindings):
                binding.bind_ortvalue_input("input_ids", buffers.ids[phase])
                binding.bind_ortvalue_input("attention_mask", buffers.mask[phase])
                binding.bind_ortvalue_output("logits", buffers.logits)
                if self.device_argmax:
                    binding.bind_ortvalue_output(NEXT_TOKEN, buffers.ids[(phase + 1) % phases])
                    binding.bind_ortvalue_output(NEXT_MASK, buffers.mask[(phase + 1) % phases])
                for past, present, value in zip(self.cache_inputs, self.cache_outputs, buffers.cache):
                    binding.bind_ortvalue_input(past, value)
                    binding.bind_ortvalue_output(present, value)
            self._step_buffers[key] = buffers
        return self._step_buffers[key]

    def verify_buffers(self, batch: int, capacity: int, tokens: int) -> VerifyBuffers:
        """The buffers of a pass of `tokens` new tokens over the (batch, capacity) step's cache (speculative
        decoding's verify pass): its own ids, mask, logits and chosen ids, the cache the step's, made and
        bound on first use; a graph id of its own, so that the pass is captured like a decode step."""
        key = (batch, capacity, tokens)
        if key not in self._verify_buffers:
            step = self.step_buffers(batch, capacity)
            vocab = self.onnx["io_shapes"]["logits"][-1]
            buffers = VerifyBuffers(ids=self.to_device(np.zeros((batch, tokens), np.int64)),
                                    mask=self.to_device(np.zeros((batch, capacity), np.int64)),
                                    chosen=self.to_device(np.zeros((batch, tokens), np.int64)),
                                    logits=self.to_device(np.zeros((batch, tokens, vocab), self.dtype)),
                                    next_mask=self.to_device(np.zeros((batch, capacity), np.int64)),
                                    binding=self.session.io_binding(),
                                    graph_id=VERIFY_GRAPHS + len(self._verify_buffers))
            binding = buffers.binding
            binding.bind_ortvalue_input("input_ids", buffers.ids)
            binding.bind_ortvalue_input("attention_mask", buffers.mask)
            binding.bind_ortvalue_output("logits", buffers.logits)
            binding.bind_ortvalue_output(NEXT_TOKEN, buffers.chosen)
            binding.bind_ortvalue_output(NEXT_MASK, buffers.next_mask)
            for past, present, value in zip(self.cache_inputs, self.cache_outputs, step.cache):
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
            self._verify_buffers[key] = buffers
        return self._verify_buffers[key]

    def run_verify(self, buffers: VerifyBuffers) -> None:
        """One verify pass through its buffers: captured (the first run captures, later ones replay) where
        decode steps are; should onnxruntime refuse to capture it, uncaptured from then on
        (`verify_capture_off` says why); returns when its ids are written."""
        graph_id = -1 if self.verify_capture_off else buffers.graph_id
        try:
            self.session.run_with_iobinding(buffers.binding, self.run_options(graph_id))
        except Exception as exc:
            if graph_id == -1 or not self.cuda_graph:
                raise
            self.verify_capture_off = first_line(exc)
            self.session.run_with_iobinding(buffers.binding, self.run_options(-1))

    def to_device(self, array: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def cache_shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        return batch, self.onnx["num_kv_heads"], length, self.onnx["head_dim"]


def graph_section(manifest: dict, graph: str | None) -> dict:
    """The `onnx` section of the graph named `graph` (a multi-depth export's tag), or the default one."""
    if graph is None:
        return manifest["onnx"]
    graphs = {g.get("tag"): g for g in manifest.get("graphs", [])}
    if graph not in graphs or "onnx" not in graphs[graph]:
        raise UserError(f"no graph '{graph}' in this export; it has: {', '.join(map(str, graphs)) or 'one graph'}")
    return graphs[graph]["onnx"]
