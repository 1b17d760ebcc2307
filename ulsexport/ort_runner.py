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
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .manifest import read_manifest

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass
class GreedyOutput:
    tokens: np.ndarray        # [batch, new_tokens]
    logits: list[np.ndarray]  # one [batch, vocab] array per generated token (fp32), if kept
    step_seconds: list[float] = field(default_factory=list)  # each forward pass and its token choice


def greedy_tokens(logits: np.ndarray) -> np.ndarray:
    """argmax over the last axis. numpy's argmax of float16 is slow (1.6 ms for 8 x 32000 logits here),
    so it runs on the bits as int16, where non-negative floats sort as their bit patterns do and
    every negative float sorts below them: one pass wherever a row's largest logit is non-negative.
    Rows whose logits are all negative are redone with the negatives' magnitude bits flipped, which
    makes the whole int16 order the float order."""
    if logits.dtype != np.float16:
        return logits.argmax(-1)
    bits = logits.view(np.int16)
    tokens = bits.argmax(-1)
    negative = np.take_along_axis(bits, tokens[..., None], -1)[..., 0] < 0
    if negative.any():
        rows = bits[negative]
        tokens[negative] = (rows ^ ((rows >> 15) & 0x7FFF)).argmax(-1)
    return tokens


def position_ids_for(attention_mask: np.ndarray, seq_len: int) -> np.ndarray:
    """HF generate's rule: count real tokens, pads get position 1; the last `seq_len` columns."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    positions[attention_mask == 0] = 1
    return positions[:, -seq_len:].astype(np.int64)


class OnnxDecoder:
    """An exported decoder folder (model.onnx + ulsexport.json) loaded in onnxruntime."""

    def __init__(self, folder: str | Path, provider: str = "cpu", io_binding: bool | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        manifest = read_manifest(folder)
        if not manifest or manifest.get("kind") != "onnx":
            raise UserError(f"{folder} has no ONNX export manifest (ulsexport.json of kind 'onnx')")
        if provider not in PROVIDERS:
            raise UserError(f"unknown provider '{provider}'; choose one of {', '.join(PROVIDERS)}")
        if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError("CUDAExecutionProvider is not available (install onnxruntime-gpu)")
        self.onnx = manifest["onnx"]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the exporter's shape annotations draw harmless warnings
        self.session = ort.InferenceSession(str(folder / self.onnx["file"]), options, providers=PROVIDERS[provider])
        self.device = provider
        self.shared_cache = self.onnx.get("kv_cache") == "shared"
        # the shared buffer is bound as input and output at once: that needs io binding, on any provider
        self.io_binding = self.shared_cache or (provider == "cuda" if io_binding is None else io_binding)
        self.cache_inputs = [n for pair in self.onnx["cache_inputs"] for n in pair]
        self.cache_outputs = [n for pair in self.onnx["cache_outputs"] for n in pair]
        self.uses_position_ids = "position_ids" in self.onnx["inputs"]
        self.dtype = NUMPY_DTYPES[self.onnx["dtype"]]

    def greedy(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int,
               keep_logits: bool = True) -> GreedyOutput:
        """Greedy decoding of `max_new_tokens` tokens (no early stop), prefill then one token a step."""
        stream = (SharedCacheStream if self.shared_cache else ConcatCacheStream)(
            self, np.asarray(input_ids), np.asarray(attention_mask), max_new_tokens)
        tokens, step_logits, seconds = [], [], []
        next_ids = None
        for _ in range(max_new_tokens):
            start = time.perf_counter()
            last = stream.forward(next_ids)  # the logits come back to the host: the step has finished
            next_ids = greedy_tokens(last)
            seconds.append(time.perf_counter() - start)
            tokens.append(next_ids)
            if keep_logits:
                step_logits.append(last.astype(np.float32))
        return GreedyOutput(np.stack(tokens, axis=1), step_logits, seconds)

    def to_device(self, array: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def cache_shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        return batch, self.onnx["num_kv_heads"], length, self.onnx["head_dim"]


class ConcatCacheStream:
    """Left-padded rows; each step's present cache becomes the next step's past."""

    def __init__(self, decoder: OnnxDecoder, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int):
        self.decoder, self.ids, self.mask = decoder, input_ids, attention_mask
        empty = np.zeros(decoder.cache_shape(len(input_ids), 0), decoder.dtype)
        self.cache = [decoder.to_device(empty) if decoder.io_binding else empty for _ in decoder.cache_inputs]

    def forward(self, next_ids: np.ndarray | None) -> np.ndarray:
        """The prompt (first call) or the tokens just chosen: one pass; the last position's logits."""
        decoder = self.decoder
        if next_ids is not None:
            self.ids = next_ids[:, None]
            self.mask = np.concatenate([self.mask, np.ones_like(self.mask[:, :1])], axis=1)
        feed = {"input_ids": self.ids.astype(np.int64), "attention_mask": self.mask.astype(np.int64)}
        if decoder.uses_position_ids:
            feed["position_ids"] = position_ids_for(self.mask, self.ids.shape[1])
        if decoder.io_binding:
            logits, self.cache = self._run_bound(feed)
        else:
            outputs = decoder.session.run(["logits", *decoder.cache_outputs],
                                          {**feed, **dict(zip(decoder.cache_inputs, self.cache))})
            logits, self.cache = outputs[0], outputs[1:]
        return logits[:, -1]

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

    def __init__(self, decoder: OnnxDecoder, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int):
        batch, prompt = input_ids.shape
        capacity = decoder.onnx.get("max_sequence_length")
        if capacity and prompt + max_new_tokens > capacity:
            raise UserError(f"{prompt} prompt + {max_new_tokens} new tokens pass the export's "
                            f"{capacity} positions")
        real = attention_mask.astype(bool)
        self.lengths = real.sum(axis=1)
        order = np.argsort(~real, axis=1, kind="stable")  # each row's real tokens first, in order
        self.ids = np.take_along_axis(input_ids, order, axis=1).astype(np.int64)
        self.mask = (np.arange(prompt)[None] < self.lengths[:, None]).astype(np.int64)
        self.decoder = decoder
        self.binding = decoder.session.io_binding()
        shape = decoder.cache_shape(batch, prompt + max_new_tokens)
        # an array each: on CPU an OrtValue wraps its numpy array's memory, so one array would be one buffer
        self.cache = [decoder.to_device(np.zeros(shape, decoder.dtype)) for _ in decoder.cache_inputs]
        for past, present, buffer in zip(decoder.cache_inputs, decoder.cache_outputs, self.cache):
            self.binding.bind_ortvalue_input(past, buffer)
            self.binding.bind_ortvalue_output(present, buffer)
        self.logits = self._bind_logits(batch, prompt)

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
        if next_ids is not None:
            self.ids = next_ids[:, None].astype(np.int64)
            self.mask = np.concatenate([self.mask, np.ones_like(self.mask[:, :1])], axis=1)
        self.binding.bind_cpu_input("input_ids", self.ids)
        self.binding.bind_cpu_input("attention_mask", self.mask)
        if self.logits.shape[1] != self.ids.shape[1]:  # the prompt's logits were bound; a step makes one row each
            self.logits = self._bind_logits(*self.ids.shape)
        self.decoder.session.run_with_iobinding(self.binding)
        if next_ids is None:  # the prompt: each row's last real token
            return self.logits[np.arange(len(self.logits)), self.lengths - 1]
        return self.logits[:, -1]  # a view: valid until the next forward
