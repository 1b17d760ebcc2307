"""The decoding streams over an onnxruntime session: one prompt batch's KV cache, in the layout the export
says (`onnx.kv_cache`), fed a token (or several) at a time; see `ort.py` for the layouts and the
fixed-width (CUDA-graph) step."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .base import DeviceLogits, position_ids_from_mask


def position_ids_for(attention_mask: np.ndarray, seq_len: int) -> np.ndarray:
    """Positions of the last `seq_len` columns of a left-padded batch (Hugging Face's rule)."""
    return position_ids_from_mask(np.array(attention_mask, np.int64))[:, -seq_len:]


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


@dataclass
class VerifyBuffers:
    """What a pass of several new tokens over a (one-row, capacity) step's cache reads and writes (speculative
    decoding's verify pass), at fixed addresses: ids [batch, n], mask [batch, capacity], the ids it chooses
    [batch, n]; its logits and next mask stay on the device, unread."""
    ids: object
    mask: object
    chosen: object
    logits: object     # bound outputs, kept here: a binding need not hold a reference to what it writes into
    next_mask: object
    binding: object
    graph_id: int


class ConcatCacheStream:
    """Left-padded rows; each step's present cache becomes the next step's past."""

    def __init__(self, decoder, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int,
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

    def __init__(self, decoder, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int,
                 cache=None, plain: bool = False):
        batch, prompt = input_ids.shape
        capacity = decoder.onnx.get("max_sequence_length")
        if capacity and prompt + max_new_tokens > capacity:
            raise UserError(f"{prompt} prompt + {max_new_tokens} new tokens pass the export's "
                            f"{capacity} positions")
        self.decoder = decoder
        self.binding = decoder.session.io_binding()
        self.steps = 0
        self.phase, self.chosen = 0, None  # the fixed-width step's phase; the ids its graph chose last
        self.mask_stale = True  # fixed width: the next step uploads its mask (the first, after a rollback or a verify)
        # given buffers are not the fixed ones; `plain` asks for the plain loop
        self.fixed_width = decoder.fixed_width and cache is None and not plain
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
        """Positions in the cache of the longest row (fixed width: the prompt's and one per token run since)."""
        if self.fixed_width:
            return int(self.lengths.max()) + self.steps
        return self.mask.shape[1]

    def truncate(self, length: int) -> None:
        """Forget every position past `length` (a rejected draft's): the graph writes the next tokens there.
        Fixed width (one row): the next step uploads a mask of `length` ones, as the first step does."""
        if not self.fixed_width:
            self.mask = self.mask[:, :length]
            return
        self._one_row("rolling the fixed-width cache back")
        self.steps = length - int(self.lengths[0])
        self.wide_mask[0, :length], self.wide_mask[0, length:] = 1, 0
        self.mask_stale = True

    def verify(self, ids) -> np.ndarray:
        """Fixed width, one row: `ids` after the cache's positions in one pass through buffers of their own
        (`OnnxDecoder.verify_buffers`: captured once per count of ids, as a decode step is), the cache
        written in place; the greedy id after each, chosen by the graph (only they come back)."""
        self._one_row("a verify pass")
        if not (self.fixed_width and self.decoder.device_argmax):
            raise UserError("a verify pass needs the fixed-width step that chooses its own ids")
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        start, n = self.length, ids.shape[1]
        buffers = self.decoder.verify_buffers(len(self.lengths), self.wide_mask.shape[1], n)
        self.wide_mask[0, :start + n], self.wide_mask[0, start + n:] = 1, 0
        buffers.mask.update_inplace(self.wide_mask)
        buffers.ids.update_inplace(ids)
        self.decoder.run_verify(buffers)
        self.steps += n
        self.mask_stale = True   # the step buffers' masks have not seen these positions
        return buffers.chosen.numpy()[0].copy()

    def _one_row(self, what: str) -> None:
        if len(self.lengths) != 1:
            raise UserError(f"{what} takes one row (onnxruntime's GroupQueryAttention runs several new tokens over a "
                            "cache only at batch 1)")

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
        if self.mask_stale or not self.decoder.device_argmax:  # else the graph made it
            self.wide_mask[np.arange(len(self.lengths)), self.lengths + self.steps - 1] = 1
            buffers.mask[phase].update_inplace(self.wide_mask)
            self.mask_stale = False
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
