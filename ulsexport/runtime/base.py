"""What every runtime offers: a prefill over the prompt, one decode step at a time, and a greedy loop
built on the two, returning one result type.

`prefill(input_ids, attention_mask, max_new_tokens)` runs the (left-padded) prompt and returns the
decoding state and each row's last logits; `step(state, next_ids)` feeds one token per row and
returns the next logits; `decode(state, next_ids, steps)` runs several steps and returns their ids
(a runtime whose steps can run ahead of the host queues them, `queued_steps` at a time). `greedy`
times each call up to the moment its tokens are known on the host, so the first entry of
`step_seconds` is the prefill and the rest are decode calls.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GreedyRun:
    tokens: np.ndarray                                        # [batch, new_tokens]
    logits: list[np.ndarray] = field(default_factory=list)    # per step [batch, vocab] fp32, if kept
    # the prefill, then each decode call: one step, or `queued_steps` steps whose ids came back together
    step_seconds: list[float] = field(default_factory=list)

    @property
    def prefill_seconds(self) -> float:
        return self.step_seconds[0] if self.step_seconds else 0.0

    @property
    def decode_seconds(self) -> float:
        return float(sum(self.step_seconds[1:]))


def position_ids_from_mask(mask):
    """Hugging Face generate's rule for left-padded batches: count real tokens; pads get position 1.
    Works on numpy arrays and torch tensors alike."""
    positions = mask.cumsum(-1) - 1
    positions[mask == 0] = 1
    return positions


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


class DeviceLogits:
    """Logits a runtime keeps where it computed them, with the greedy ids chosen there too: `tokens()`
    brings back only the ids, `host()` the logits [batch, vocab]."""

    def tokens(self) -> np.ndarray:
        raise NotImplementedError

    def host(self) -> np.ndarray:
        raise NotImplementedError


class Runtime:
    """A decoder with a KV cache. Subclasses give `prefill` and `step`; logits are numpy arrays or
    DeviceLogits unless a subclass keeps its own (then it overrides `next_tokens` and `to_host`)."""

    name = ""
    queued_steps = 1  # decode steps `greedy` hands to one `decode` call

    def prefill(self, input_ids, attention_mask, max_new_tokens: int):
        """Run the prompt; (state, each row's last logits [batch, vocab])."""
        raise NotImplementedError

    def step(self, state, next_ids):
        """Feed one token per row; the next logits [batch, vocab]."""
        raise NotImplementedError

    def next_tokens(self, logits):
        """The greedy choice, known on the host when this returns (the step's work has finished)."""
        return logits.tokens() if isinstance(logits, DeviceLogits) else greedy_tokens(logits)

    def to_host(self, array) -> np.ndarray:
        return array.host() if isinstance(array, DeviceLogits) else np.asarray(array)

    def decode(self, state, next_ids, steps: int) -> list:
        """`steps` greedy decode steps from `next_ids`; each step's ids as `next_tokens` gives them, all
        known on the host when this returns. This one runs a step at a time; a runtime whose steps can
        run ahead of the host overrides it (`queued_steps` > 1)."""
        chosen = []
        for _ in range(steps):
            next_ids = self.next_tokens(self.step(state, next_ids))
            chosen.append(next_ids)
        return chosen

    def greedy(self, input_ids, attention_mask, new_tokens: int, keep_logits: bool = False,
               **prefill_options) -> GreedyRun:
        """Greedy decoding of exactly `new_tokens` tokens (no early stop); `prefill_options` go to
        `prefill` (a multi-depth runtime's depth, say). Without `keep_logits` the decode steps go to
        `decode`, `queued_steps` at a time."""
        tokens, kept, seconds = [], [], []
        state = next_ids = None
        while len(tokens) < new_tokens:
            start = time.perf_counter()
            if state is None:
                state, logits = self.prefill(input_ids, attention_mask, new_tokens, **prefill_options)
                chosen = [self.next_tokens(logits)]
            elif keep_logits:
                logits = self.step(state, next_ids)
                chosen = [self.next_tokens(logits)]
            else:
                chosen = self.decode(state, next_ids, min(self.queued_steps, new_tokens - len(tokens)))
            seconds.append(time.perf_counter() - start)
            if keep_logits:
                kept.append(self.to_host(logits).astype(np.float32))
            tokens.extend(chosen)
            next_ids = chosen[-1]
        return GreedyRun(np.stack([self.to_host(t) for t in tokens], axis=1), kept, seconds)
