"""One decode engine with continuous batching: requests in, tokens out, one loop (schedule, execute, update).

Over an ONNX export with the shared KV cache (`ort.OnnxDecoder`, or every depth of a `MultiDepthDecoder`),
each depth holds `slots` rows of preallocated cache buffers, [slots, kv_heads, capacity, head_dim] per
cache tensor. A request lives in one row (a slot) from its prefill until it stops. Each `step()`:

1. schedule: waiting requests take the lowest free slots of their depth (first come, first served);
2. execute: the admitted prompts run into their slots' rows of the buffers (the cache tensors bound by
   address: no copy), giving their first tokens (those admitted together into consecutive slots of a depth
   in one pass, where the graph chooses the ids; else one at a time); then, per depth with running requests,
   one decode step over the slots up to the highest one in use (free slots among them run a dummy
   token into their own rows, which the next prefill there overwrites);
3. update: each token goes to its request (`on_token`), and the one stop policy (`Request.finished`:
   an end-of-sequence id, `max_tokens`, cancellation) frees the slot at once, so the next waiting
   request joins the running batch at the next step instead of waiting for the whole batch to end.

Rows are independent: the graph reads each row's length from its attention mask row and writes the
new token's keys and values at that position, so a request's tokens are the ones `greedy` gives it
alone. Speculative requests (an engine made with a `draft` depth) run on batch-1 streams of their own
(`speculative.SpeculativeRow`: onnxruntime verifies several tokens over a cache only at batch 1), one
draft-and-verify round per step, beside the slots; their tokens are the full depth's. `add` and `cancel` may be called from any thread; `step` from one thread (`run_forever`).
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import UserError
from .base import greedy_tokens
from .ort_session import NEXT_MASK, NEXT_TOKEN

DEFAULT_SLOTS = 8
ENGINE_GRAPH_IDS = 10_000   # + batch size: the engine's captured steps, apart from the decoder's own graph ids


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_tokens: int
    depth: str | None = None                          # a multi-depth export's tag (None: its default graph)
    speculative: bool = False                         # drafted by the engine's draft depth, verified at `depth`
    eos: frozenset = frozenset()
    on_token: Callable[["Request", int], None] | None = None   # called on the engine's thread, token by token
    on_error: Callable[["Request", Exception], None] | None = None   # a step failed: this request ends
    tokens: list[int] = field(default_factory=list)
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    finish_reason: str | None = None                  # "eos", "length", "cancelled" or "error" once finished
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def finished(self) -> str | None:
        """The stop policy, in one place: why this request stops after its newest token (None: it goes on)."""
        if self.cancelled:
            return "cancelled"
        if self.tokens and self.tokens[-1] in self.eos:
            return "eos"
        if len(self.tokens) >= self.max_tokens:
            return "length"
        return None


_ids = itertools.count()


class _Slots:
    """One depth's cache buffers and the requests in its rows."""

    def __init__(self, decoder, slots: int, capacity: int):
        if not decoder.shared_cache:
            raise UserError("the decode engine needs an export with the shared KV cache (ulsexport onnx, the "
                            "default --kv-cache shared); this one concatenates its cache")
        self.decoder, self.capacity = decoder, capacity
        self.rows: list[Request | None] = [None] * slots
        shape = decoder.cache_shape(slots, capacity)
        self.cache = [decoder.to_device(np.zeros(shape, decoder.dtype)) for _ in decoder.cache_inputs]
        self.row_bytes = int(np.prod(shape[1:])) * np.dtype(decoder.dtype).itemsize
        self.lengths = np.zeros(slots, np.int64)      # tokens in each row's cache
        self.vocab = decoder.onnx["io_shapes"]["logits"][-1]
        # the fixed-width step (a decoder with one, as on CUDA): ids, a mask as wide as the cache and the logits
        # at fixed addresses, one binding per batch size run, each a CUDA graph where the session captures;
        # where the graph chooses the ids itself (device_argmax) only they come back, not the logits
        self.fixed = decoder.fixed_width
        self.device_argmax = self.fixed and decoder.device_argmax
        if self.fixed:
            self.ids = decoder.to_device(np.zeros((slots, 1), np.int64))
            self.mask = np.zeros((slots, capacity), np.int64)
            self.mask[:, 0] = 1                           # free rows: one dummy position
            self.mask_value = decoder.to_device(self.mask)
            self.logits = decoder.to_device(np.zeros((slots, 1, self.vocab), decoder.dtype))
            self.step_bindings: dict[int, tuple] = {}
        if self.device_argmax:   # the graph's choices, and its next mask (unused: the host keeps the mask)
            self.chosen = decoder.to_device(np.zeros((slots, 1), np.int64))
            self.next_mask = decoder.to_device(np.zeros((slots, capacity), np.int64))

    def free(self) -> int | None:
        return next((i for i, r in enumerate(self.rows) if r is None), None)

    def running(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is not None]

    def _bind_cache(self, binding, first: int, count: int) -> None:
        decoder = self.decoder
        shape = list(decoder.cache_shape(count, self.capacity))
        for past, present, value in zip(decoder.cache_inputs, decoder.cache_outputs, self.cache):
            address = value.data_ptr() + first * self.row_bytes
            for name, bind in ((past, binding.bind_input), (present, binding.bind_output)):
                bind(name, decoder.device, 0, decoder.dtype, shape, address)

    def _run(self, binding, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One uncaptured pass (a prompt's, or the plain decode step)."""
        import onnxruntime as ort

        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        logits = np.empty((ids.shape[0], ids.shape[1], self.vocab), self.decoder.dtype)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.decoder.session.run_with_iobinding(binding, self.decoder.run_options(-1))
        return logits

    def _step_binding(self, count: int):
        """The fixed-width step over rows 0..count-1 (bound by address, so a captured graph replays on them)."""
        if count not in self.step_bindings:
            decoder = self.decoder
            binding = decoder.session.io_binding()
            binding.bind_input("input_ids", decoder.device, 0, np.int64, [count, 1], self.ids.data_ptr())
            binding.bind_input("attention_mask", decoder.device, 0, np.int64, [count, self.capacity],
                               self.mask_value.data_ptr())
            binding.bind_output("logits", decoder.device, 0, decoder.dtype, [count, 1, self.vocab],
                                self.logits.data_ptr())
            if self.device_argmax:
                binding.bind_output(NEXT_TOKEN, decoder.device, 0, np.int64, [count, 1], self.chosen.data_ptr())
                binding.bind_output(NEXT_MASK, decoder.device, 0, np.int64, [count, self.capacity],
                                    self.next_mask.data_ptr())
            self._bind_cache(binding, 0, count)
            self.step_bindings[count] = binding, ENGINE_GRAPH_IDS + count
        return self.step_bindings[count]

    def prefill(self, run: list[tuple[Request, int]]) -> list[int]:
        """Prompts into consecutive rows (`run`: (request, slot), slots ascending by one), their first tokens.
        Where the graph chooses ids, in one pass: the prompts right-padded to the longest (each row's cache
        past its prompt gets the padding's keys and values, masked until its own tokens overwrite them), only
        the chosen ids read back (the logits stay on the device); elsewhere one prompt at a time, its logits
        read back."""
        if not self.device_argmax:
            return [self._prefill_one(slot, request) for request, slot in run]
        lengths = [len(request.prompt) for request, _ in run]
        ids = np.zeros((len(run), max(lengths)), np.int64)
        mask = np.zeros_like(ids)
        for row, (request, _) in enumerate(run):
            ids[row, :lengths[row]], mask[row, :lengths[row]] = request.prompt, 1
        binding = self.decoder.session.io_binding()
        self._bind_cache(binding, run[0][1], len(run))
        chosen = self._run_choosing(binding, ids, mask)
        for request, slot in run:
            self._take(slot, request)
        return [int(chosen[row, length - 1]) for row, length in enumerate(lengths)]

    def _prefill_one(self, slot: int, request: Request) -> int:
        binding = self.decoder.session.io_binding()
        self._bind_cache(binding, slot, 1)
        ids = np.array([request.prompt], np.int64)
        token = int(greedy_tokens(self._run(binding, ids, np.ones_like(ids))[0, -1]))
        self._take(slot, request)
        return token

    def _take(self, slot: int, request: Request) -> None:
        """Row `slot` now holds `request`'s prompt."""
        self.rows[slot], self.lengths[slot] = request, len(request.prompt)
        if self.fixed:
            self.mask[slot] = 0
            self.mask[slot, :len(request.prompt)] = 1

    def _run_choosing(self, binding, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One uncaptured pass of right-padded prompts through the graph that chooses ids: its choice after
        every position [rows, width] (the logits stay where they are made)."""
        import onnxruntime as ort

        decoder = self.decoder
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        chosen = np.empty(ids.shape, np.int64)
        binding.bind_ortvalue_output(NEXT_TOKEN, ort.OrtValue.ortvalue_from_numpy(chosen))
        binding.bind_output("logits", decoder.device)   # onnxruntime allocates them, on the device
        binding.bind_output(NEXT_MASK, decoder.device)
        decoder.session.run_with_iobinding(binding, decoder.run_options(-1))
        return chosen

    def release(self, slot: int) -> None:
        self.rows[slot], self.lengths[slot] = None, 0
        if self.fixed:
            self.mask[slot] = 0
            self.mask[slot, 0] = 1

    def decode(self) -> dict[int, int]:
        """One step over rows 0..highest running: each running row's newest token in, its next token out."""
        running = self.running()
        if self.fixed:
            return self._fixed_decode(running)
        count = running[-1] + 1
        ids = np.zeros((count, 1), np.int64)
        lengths = np.zeros(count, np.int64)              # free rows: one dummy token at position 0
        for i in running:
            ids[i, 0], lengths[i] = self.rows[i].tokens[-1], self.lengths[i]
        mask = (np.arange(lengths.max() + 1)[None] <= lengths[:, None]).astype(np.int64)
        binding = self.decoder.session.io_binding()
        self._bind_cache(binding, 0, count)
        chosen = greedy_tokens(self._run(binding, ids, mask)[:, -1])
        for i in running:
            self.lengths[i] += 1
        return {i: int(chosen[i]) for i in running}


    def _fixed_decode(self, running: list[int]) -> dict[int, int]:
        """The fixed-width step over the rows up to the highest running one, rounded up to a power of two (few
        batch sizes, so few captured graphs): each running row's newest token in, one mask column more."""
        count = min(1 << running[-1].bit_length(), len(self.rows))
        ids = np.zeros((len(self.rows), 1), np.int64)
        for i in running:
            ids[i, 0] = self.rows[i].tokens[-1]
            self.mask[i, self.lengths[i]] = 1
        self.ids.update_inplace(ids)
        self.mask_value.update_inplace(self.mask)
        binding, graph_id = self._step_binding(count)
        self.decoder.session.run_with_iobinding(binding, self.decoder.run_options(graph_id))
        if self.device_argmax:   # count ids back, not count x vocab logits
            chosen = self.chosen.numpy()[:count, 0]
        else:
            chosen = greedy_tokens(self.logits.numpy()[:count, 0])
        for i in running:
            self.lengths[i] += 1
        return {i: int(chosen[i]) for i in running}


def _consecutive(admitted: list[tuple[Request, _Slots | None, int | None]]):
    """The admitted requests that took slots, as (slots, [(request, slot), ...]): per depth, runs of
    consecutive slots, ascending."""
    by_depth: dict[int, tuple[_Slots, list]] = {}
    for request, slots, slot in admitted:
        if slots is not None:
            by_depth.setdefault(id(slots), (slots, []))[1].append((request, slot))
    for slots, taken in by_depth.values():
        taken.sort(key=lambda item: item[1])
        run = [taken[0]]
        for item in taken[1:]:
            if item[1] != run[-1][1] + 1:
                yield slots, run
                run = []
            run.append(item)
        yield slots, run


class DecodeEngine:
    """Continuous batching over `runtime` (an OnnxDecoder or MultiDepthDecoder over a shared-cache export):
    `slots` requests run at once per depth, each with up to `capacity` positions (prompt + new tokens). Where
    its decoders have the fixed-width step (CUDA), the engine captures its own steps, one graph per batch
    size, and with the graph's own argmax (`device_argmax`, the default) reads back only the chosen ids."""

    def __init__(self, runtime, slots: int = DEFAULT_SLOTS, capacity: int | None = None, draft: str | None = None,
                 draft_tokens: int = 4):
        if slots < 1:
            raise UserError(f"slots {slots} must be at least 1")
        self.runtime, self.draft, self.draft_tokens = runtime, draft, draft_tokens
        if draft is not None:
            from .speculative import check_draft

            check_draft(runtime, draft, draft_tokens)
        self.speculating: list = []   # (Request, SpeculativeRow): batch-1 streams of their own, `slots` at most
        decoders = runtime.decoders if hasattr(runtime, "decoders") else {None: runtime}
        limit = runtime.onnx.get("max_sequence_length")
        self.capacity = int(capacity or limit or 2048)
        if limit and self.capacity > limit:
            raise UserError(f"capacity {self.capacity} passes the export's {limit} positions")
        self.default = getattr(runtime, "default", None)
        self.depths = {tag: _Slots(decoder, slots, self.capacity) for tag, decoder in decoders.items()}
        self.waiting: deque[Request] = deque()
        self.lock = threading.Condition()
        self.steps = 0

    # -- from any thread -----------------------------------------------------------------------------
    def add(self, request: Request) -> Request:
        depth = request.depth if request.depth is not None else self.default
        if depth not in self.depths:
            raise UserError(f"no depth '{request.depth}' here; it has: {', '.join(map(str, self.depths))}")
        if not request.prompt:
            raise UserError("the prompt is empty")
        if len(request.prompt) + request.max_tokens > self.capacity:
            raise UserError(f"the prompt's {len(request.prompt)} tokens + max_tokens {request.max_tokens} pass the "
                            f"engine's {self.capacity} positions")
        if request.max_tokens < 1:
            raise UserError(f"max_tokens {request.max_tokens} must be at least 1")
        if request.speculative and self.draft is None:
            raise UserError("this engine has no draft depth for speculative requests")
        if request.speculative and depth == self.draft:
            raise UserError(f"a speculative request is verified at the full depth, not the draft depth '{depth}'")
        request.depth = depth
        with self.lock:
            self.waiting.append(request)
            self.lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Stop `request` at the next step (its slot is freed then); a waiting one never starts."""
        with self.lock:
            request.cancelled = True
            self.lock.notify_all()

    def has_work(self) -> bool:
        with self.lock:
            return bool(self.waiting) or bool(self.speculating) or any(s.running() for s in self.depths.values())

    # -- the loop's thread ---------------------------------------------------------------------------
    def step(self) -> int:
        """Schedule, execute, update once; the number of tokens produced."""
        produced = 0
        admitted = self._schedule()
        for request, slots, slot in admitted:
            if slots is None:      # speculative: its own streams, prefilled now
                produced += self._speculate(request)
        for slots, run in _consecutive(admitted):   # the prompts admitted together, prefilled together
            for (request, slot), token in zip(run, slots.prefill(run)):
                produced += self._update(slots, slot, request, token)
        for request, row in list(self.speculating):
            produced += self._speculate(request, row)
        for slots in self.depths.values():
            for slot in [i for i in slots.running() if slots.rows[i].cancelled]:
                self._finish(slots, slot, slots.rows[slot])
            if slots.running():
                for slot, token in slots.decode().items():
                    produced += self._update(slots, slot, slots.rows[slot], token)
        self.steps += 1
        return produced

    def _schedule(self) -> list[tuple[Request, _Slots, int]]:
        admitted = []
        with self.lock:
            kept = deque()
            while self.waiting:
                request = self.waiting.popleft()
                if request.cancelled:
                    request.finish_reason, request.finished_at = "cancelled", time.perf_counter()
                    continue
                if request.speculative:
                    if len(self.speculating) + sum(1 for a in admitted if a[1] is None) >= len(self.depths[request.depth].rows):
                        kept.append(request)
                    else:
                        admitted.append((request, None, None))
                    continue
                slots = self.depths[request.depth]
                slot = slots.free()
                if slot is None:
                    kept.append(request)
                    continue
                slots.rows[slot] = request   # taken now; the prefill fills it
                admitted.append((request, slots, slot))
            self.waiting = kept
        return admitted

    def _emit(self, request: Request, token: int) -> bool:
        """`token` to `request`; whether the stop policy ends it here."""
        request.tokens.append(token)
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        reason = request.finished()
        if reason is not None:
            request.finish_reason = reason
        if request.on_token is not None:
            request.on_token(request, token)
        return reason is not None

    def _update(self, slots: _Slots, slot: int, request: Request, token: int) -> int:
        if self._emit(request, token):
            self._finish(slots, slot, request)
        return 1

    def _speculate(self, request: Request, row=None) -> int:
        """A speculative request's prefill (row None: its first token) or one draft-and-verify round; the
        tokens it kept, each through the stop policy."""
        from .speculative import SpeculativeRow

        if row is None:
            row = SpeculativeRow(self.runtime.decoder(self.draft), self.runtime.decoder(request.depth), request.prompt,
                                 request.max_tokens, self.draft_tokens)
            self.speculating.append((request, row))
            new = row.tokens[:1]
        elif request.cancelled:
            new = []
        else:
            new = row.advance()
        for count, token in enumerate(new, 1):
            if self._emit(request, token):
                self._end_speculation(request)
                return count
        if request.cancelled:
            self._end_speculation(request)
        return len(new)

    def _end_speculation(self, request: Request) -> None:
        request.finish_reason = request.finish_reason or "cancelled"
        request.finished_at = time.perf_counter()
        self.speculating = [(r, row) for r, row in self.speculating if r is not request]

    def _finish(self, slots: _Slots, slot: int, request: Request) -> None:
        request.finish_reason = request.finish_reason or "cancelled"
        request.finished_at = time.perf_counter()
        slots.release(slot)

    def run(self, requests: list[Request]) -> list[Request]:
        """Add `requests` and step until every request here has finished."""
        for request in requests:
            self.add(request)
        while self.has_work():
            self.step()
        return requests

    def fail_all(self, exc: Exception) -> list[Request]:
        """A step failed: every waiting and running request ends with `exc` (its `on_error`), every slot is
        freed, and the engine goes on with the requests that come next."""
        with self.lock:
            failed, self.waiting = list(self.waiting), deque()
        failed += [request for request, _ in self.speculating]
        self.speculating = []
        for slots in self.depths.values():
            for slot in slots.running():
                failed.append(slots.rows[slot])
                slots.release(slot)
        for request in failed:
            request.finish_reason, request.finished_at = "error", time.perf_counter()
            if request.on_error is not None:
                request.on_error(request, exc)
        return failed

    def run_forever(self, stop: threading.Event, on_step: Callable[[int], None] | None = None,
                    idle_wait: float = 0.05) -> None:
        """Step while there is work (`on_step(tokens produced)` after each), sleep on the lock while there is
        none, return once `stop` is set. A failing step fails the requests it held (`fail_all`), not the loop."""
        while not stop.is_set():
            if self.has_work():
                try:
                    produced = self.step()
                except Exception as exc:  # the runtime's failure: its requests get the error, the loop goes on
                    self.fail_all(exc)
                    continue
                if on_step is not None:
                    on_step(produced)
            else:
                with self.lock:
                    self.lock.wait(idle_wait)

    def running(self) -> int:
        return sum(len(s.running()) for s in self.depths.values()) + len(self.speculating)
