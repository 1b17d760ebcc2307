"""Running an exported ONNX decoder: an onnxruntime session and a greedy loop over its KV cache.

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

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np

from ..artifact import artifact_path, read_manifest
from ..errors import UserError, first_line
from . import kernels
from .base import DeviceLogits, Runtime, position_ids_from_mask

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}
CAPACITY_STEP = 256  # fixed-width cache buffers are rounded up to this, so that calls share captured graphs
QUEUED_STEPS = 8  # captured decode steps queued before their ids are read: the host's time per step / 8


def position_ids_for(attention_mask: np.ndarray, seq_len: int) -> np.ndarray:
    """Positions of the last `seq_len` columns of a left-padded batch (Hugging Face's rule)."""
    return position_ids_from_mask(np.array(attention_mask, np.int64))[:, -seq_len:]


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
        manifest = read_manifest(folder)
        if not manifest or manifest.get("kind") != "onnx":
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
        # the shared buffer is bound as input and output at once: that needs io binding, on any provider
        self.io_binding = self.shared_cache or (provider == "cuda" if io_binding is None else io_binding)
        self.cache_inputs = [n for pair in self.onnx["cache_inputs"] for n in pair]
        self.cache_outputs = [n for pair in self.onnx["cache_outputs"] for n in pair]
        self.uses_position_ids = "position_ids" in self.onnx["inputs"]
        self.dtype = NUMPY_DTYPES[self.onnx["dtype"]]

    @classmethod
    def open(cls, folder: str | Path, dtype: str | None = None, device: str = "cpu", **options) -> Runtime:
        """The runtime over an export: an OnnxDecoder, or a MultiDepthDecoder for a multi-depth export;
        `options` are the decoder's (`cuda_graph` None captures decode steps where it can: CUDA, shared
        cache; False never; True or refuse)."""
        options = {k: v for k, v in options.items() if v is not None}
        decoder = MultiDepthDecoder(folder, device, **options) if (read_manifest(folder) or {}).get("multi_depth") \
            else cls(folder, device, **options)
        if dtype is not None and dtype != decoder.onnx["dtype"]:
            raise UserError(f"{folder} is a {decoder.onnx['dtype']} export; --runtime ort runs it in "
                            f"{decoder.onnx['dtype']}, not {dtype}")
        return decoder

    def prefill(self, input_ids, attention_mask, max_new_tokens: int):
        """The prompt's pass; the logits come back to the host, so the step has finished."""
        stream = self.stream(input_ids, attention_mask, max_new_tokens)
        return stream, stream.forward(None)

    def stream(self, input_ids, attention_mask, max_new_tokens: int, cache=None):
        """A decoding stream over this graph; `cache` (one value per cache input) continues from a prompt
        another graph ran, its first forward being a decode step."""
        return (SharedCacheStream if self.shared_cache else ConcatCacheStream)(
            self, np.asarray(input_ids), np.asarray(attention_mask), max_new_tokens, cache)

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


@dataclass
class StepBuffers:
    """What one (batch, capacity) decode step reads and writes, at fixed addresses for the decoder's life;
    ids, mask, bindings and graph ids per phase."""
    cache: list
    ids: list         # OrtValue [batch, 1] int64
    mask: list        # OrtValue [batch, capacity] int64
    logits: object    # OrtValue [batch, 1, vocab]
    bindings: list    # IOBinding of one phase's inputs and outputs
    graph_ids: list


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


class ConcatCacheStream:
    """Left-padded rows; each step's present cache becomes the next step's past."""

    def __init__(self, decoder: OnnxDecoder, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int,
                 cache=None):
        self.decoder, self.ids, self.mask = decoder, input_ids, attention_mask
        empty = np.zeros(decoder.cache_shape(len(input_ids), 0), decoder.dtype)
        self.cache = cache or [decoder.to_device(empty) if decoder.io_binding else empty for _ in decoder.cache_inputs]

    def forward(self, next_ids: np.ndarray | None) -> np.ndarray:
        """The prompt (first call) or the tokens just chosen: one pass; the last position's logits."""
        return self._run(None if next_ids is None else next_ids[:, None])[:, -1]

    def feed(self, ids: np.ndarray) -> np.ndarray:
        """Several new tokens per row [rows, n] in one pass: the logits after each [rows, n, vocab]."""
        return self._run(np.asarray(ids, np.int64))

    @property
    def length(self) -> int:
        """Positions in the cache (the prompt's padding included)."""
        return self.mask.shape[1]

    def truncate(self, length: int) -> None:
        """Forget every position past `length` (a rejected draft's)."""
        self.mask = self.mask[:, :length]
        if self.decoder.io_binding:  # device values: sliced through the host (the concat layout's price)
            self.cache = [self.decoder.to_device(np.ascontiguousarray(c.numpy()[:, :, :length])) for c in self.cache]
        else:
            self.cache = [c[:, :, :length] for c in self.cache]

    def _run(self, new_ids: np.ndarray | None) -> np.ndarray:
        decoder = self.decoder
        if new_ids is not None:
            self.ids = new_ids
            self.mask = np.concatenate([self.mask, np.ones((len(new_ids), new_ids.shape[1]), self.mask.dtype)], axis=1)
        feed = {"input_ids": self.ids.astype(np.int64), "attention_mask": self.mask.astype(np.int64)}
        if decoder.uses_position_ids:
            feed["position_ids"] = position_ids_for(self.mask, self.ids.shape[1])
        if decoder.io_binding:
            logits, self.cache = self._run_bound(feed)
        else:
            outputs = decoder.session.run(["logits", *decoder.cache_outputs],
                                          {**feed, **dict(zip(decoder.cache_inputs, self.cache))})
            logits, self.cache = outputs[0], outputs[1:]
        return logits

    def _run_bound(self, feed: dict):
        decoder = self.decoder
        binding = decoder.session.io_binding()
        for name, array in feed.items():
            binding.bind_ortvalue_input(name, decoder.to_device(array))
        for name, value in zip(decoder.cache_inputs, self.cache):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in decoder.cache_outputs:
            binding.bind_output(name, decoder.device)
        decoder.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), outputs[1:]


class SharedCacheStream:
    """Right-padded rows over one cache buffer per tensor, bound as past and present for every step."""

    def __init__(self, decoder: OnnxDecoder, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int,
                 cache=None):
        batch, prompt = input_ids.shape
        capacity = decoder.onnx.get("max_sequence_length")
        if capacity and prompt + max_new_tokens > capacity:
            raise UserError(f"{prompt} prompt + {max_new_tokens} new tokens pass the export's "
                            f"{capacity} positions")
        self.decoder = decoder
        self.binding = decoder.session.io_binding()
        self.steps = 0
        self.phase, self.chosen = 0, None  # the fixed-width step's phase; the ids its graph chose last
        self.fixed_width = decoder.fixed_width and cache is None  # given buffers are not the fixed ones
        # rows past the caller's `rows` (a given cache's, or a fixed-width step's batch rounded up): one
        # token each, run and dropped from every result
        self.rows, extra = batch, 0
        if cache is not None:
            extra = cache[0].shape()[0] - batch
        elif self.fixed_width:
            extra = decoder.rows_for(batch) - batch
        real = attention_mask.astype(bool)
        order = np.argsort(~real, axis=1, kind="stable")  # each row's real tokens first, in order
        self.ids = np.concatenate([np.take_along_axis(input_ids, order, axis=1).astype(np.int64),
                                   np.zeros((extra, prompt), np.int64)])
        self.lengths = np.concatenate([real.sum(axis=1), np.ones(extra, np.int64)])
        self.mask = (np.arange(prompt)[None] < self.lengths[:, None]).astype(np.int64)
        batch = len(self.ids)
        if cache is not None:
            self.cache = cache
        elif self.fixed_width:
            self.buffers = decoder.step_buffers(batch, decoder.capacity_for(prompt + max_new_tokens))
            self.cache = self.buffers.cache
            self.wide_mask = np.zeros(self.buffers.mask[0].shape(), np.int64)
            self.wide_mask[:, :prompt] = self.mask
        else:
            shape = decoder.cache_shape(batch, prompt + max_new_tokens)
            # an array each: on CPU an OrtValue wraps its numpy array's memory, so one array would be one buffer
            self.cache = [decoder.to_device(np.zeros(shape, decoder.dtype)) for _ in decoder.cache_inputs]
        for past, present, buffer in zip(decoder.cache_inputs, decoder.cache_outputs, self.cache):
            self.binding.bind_ortvalue_input(past, buffer)
            self.binding.bind_ortvalue_output(present, buffer)
        self.logits = self._bind_logits(batch, prompt)

    def _padded(self, next_ids: np.ndarray) -> np.ndarray:
        """The caller's ids for the next step, with a token for each row past its own."""
        next_ids = np.asarray(next_ids, np.int64).reshape(-1)
        return np.concatenate([next_ids, np.zeros(len(self.lengths) - len(next_ids), np.int64)])

    def _bind_logits(self, batch: int, seq: int) -> np.ndarray:
        """A host array bound as the logits output: onnxruntime copies into it, and reading it needs no
        get_outputs() (which wraps every bound output, the whole cache included, each step)."""
        import onnxruntime as ort

        logits = np.empty((batch, seq, self.decoder.onnx["io_shapes"]["logits"][-1]), self.decoder.dtype)
        self.logits_value = ort.OrtValue.ortvalue_from_numpy(logits)  # wraps the array's memory
        self.binding.bind_ortvalue_output("logits", self.logits_value)
        return logits

    def forward(self, next_ids: np.ndarray | None) -> np.ndarray:
        """The prompt (first call) or the tokens just chosen: one pass; each row's last logits
        (a view, overwritten by the next pass)."""
        if next_ids is not None and self.fixed_width:
            return self._fixed_width_step(next_ids)
        if next_ids is not None:
            self.ids = self._padded(next_ids)[:, None]
            self.mask = np.concatenate([self.mask, np.ones_like(self.mask[:, :1])], axis=1)
        self.binding.bind_cpu_input("input_ids", self.ids)
        self.binding.bind_cpu_input("attention_mask", self.mask)
        if self.logits.shape[1] != self.ids.shape[1]:  # the prompt's logits were bound; a step makes one row each
            self.logits = self._bind_logits(*self.ids.shape)
        self.decoder.session.run_with_iobinding(self.binding, self.decoder.run_options(-1))
        if next_ids is None:  # the prompt: each row's last real token
            return self.logits[np.arange(self.rows), self.lengths[:self.rows] - 1]
        return self.logits[:self.rows, -1]  # a view: valid until the next forward

    def feed(self, ids: np.ndarray) -> np.ndarray:
        """Several new tokens per row [rows, n] in one pass (onnxruntime's GroupQueryAttention takes more
        than one new token over a cache only at batch 1): the logits after each [rows, n, vocab], a view."""
        if self.fixed_width:
            raise UserError("several tokens at once need the plain decode loop (fixed_width=False)")
        ids = np.asarray(ids, np.int64)
        self.ids = np.concatenate([ids, np.zeros((len(self.lengths) - len(ids), ids.shape[1]), np.int64)])
        self.mask = np.concatenate([self.mask, np.ones((len(self.ids), ids.shape[1]), np.int64)], axis=1)
        self.binding.bind_cpu_input("input_ids", self.ids)
        self.binding.bind_cpu_input("attention_mask", self.mask)
        if self.logits.shape[1] != self.ids.shape[1]:
            self.logits = self._bind_logits(*self.ids.shape)
        self.decoder.session.run_with_iobinding(self.binding, self.decoder.run_options(-1))
        return self.logits[:self.rows]

    @property
    def length(self) -> int:
        """Positions in the cache of the longest row."""
        return self.mask.shape[1]

    def truncate(self, length: int) -> None:
        """Forget every position past `length` (a rejected draft's): the graph writes the next tokens there."""
        if self.fixed_width:
            raise UserError("rolling the cache back needs the plain decode loop (fixed_width=False)")
        self.mask = self.mask[:, :length]

    def _fixed_width_step(self, next_ids: np.ndarray):
        """One decode step through the fixed buffers (captured as a CUDA graph, or replayed): the logits,
        or with the graph's own next inputs a StepLogits that leaves them on the device."""
        self._launch(next_ids)
        if not self.decoder.device_argmax:
            return self.buffers.logits.numpy()[:self.rows, -1]
        return StepLogits(self, self.buffers.ids[self.phase])

    def decode(self, next_ids: np.ndarray, steps: int) -> list[np.ndarray]:
        """`steps` fixed-width steps from `next_ids` (at most `queued_steps`), queued back to back: each
        reads the ids and mask the one before wrote, only the last waits for the GPU. Their ids."""
        phases = len(self.buffers.ids)
        if not 0 < steps < phases:
            raise ValueError(f"{steps} steps: this decoder queues 1 to {phases - 1}")
        first = self.phase
        for step in range(steps):
            self._launch(next_ids if step == 0 else None, wait=step == steps - 1)
        chosen = [self.buffers.ids[(first + 1 + step) % phases].numpy()[:self.rows, 0].copy()
                  for step in range(steps)]
        self.chosen = chosen[-1].copy()  # not the caller's array, which the caller may change
        return chosen

    def _launch(self, next_ids: np.ndarray | None, wait: bool = True) -> None:
        """Run the step of this phase, `next_ids` uploaded unless they are the ids the graph wrote there
        (None: they are); with `wait` False onnxruntime returns once the captured graph is launched."""
        buffers, phase = self.buffers, self.phase
        self.steps += 1
        if self.steps == 1 or not self.decoder.device_argmax:  # later masks the graph makes itself
            self.wide_mask[np.arange(len(self.lengths)), self.lengths + self.steps - 1] = 1
            buffers.mask[phase].update_inplace(self.wide_mask)
        if next_ids is not None and (self.chosen is None or not np.array_equal(next_ids.reshape(-1), self.chosen)):
            buffers.ids[phase].update_inplace(self._padded(next_ids)[:, None])
        self.chosen = None
        run_options = self.decoder.run_options(buffers.graph_ids[phase], wait)
        self.decoder.session.run_with_iobinding(buffers.bindings[phase], run_options)
        self.phase = (phase + 1) % len(buffers.ids)


class StepLogits(DeviceLogits):
    """A fixed-width step's logits, left in their buffer, and the ids the graph's argmax chose into the
    next step's ids buffer; both valid until the stream's next step. Ids fed back unchanged, as
    `tokens()` returned them, are not uploaded again."""

    def __init__(self, stream: SharedCacheStream, chosen):
        self.stream, self.chosen = stream, chosen

    def tokens(self) -> np.ndarray:
        ids = self.chosen.numpy()[:self.stream.rows, 0].copy()  # on the CPU the value wraps the buffer
        self.stream.chosen = ids.copy()  # not the caller's array, which the caller may change
        return ids

    def host(self) -> np.ndarray:
        return self.stream.buffers.logits.numpy()[:self.stream.rows, -1]


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
        manifest = read_manifest(folder) or {}
        if not manifest.get("multi_depth"):
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
