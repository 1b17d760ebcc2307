"""Self-speculative greedy decoding over a multi-depth export: a pruned depth drafts, the full depth verifies.

Both depths run over the one weights file of `ulsexport onnx --speedups` (`ort.MultiDepthDecoder`). Each
keeps its own KV cache (the draft's layers see other hidden states than the full depth's do). A round:

1. the draft decodes `draft_tokens` (K) tokens greedily, one step each, after the last token kept;
2. the full depth runs that last token and the K drafted ones in one pass (K + 1 logits);
3. the drafted tokens are kept up to the first one the full depth would not have chosen, then the full
   depth's own choice at that place (so every round keeps 1 to K + 1 tokens);
4. both caches roll back to what was kept (shared layout: the attention mask only; concat: a slice).

The result is token for token the full depth's greedy output: every kept token is the full depth's
argmax after exactly the tokens before it. onnxruntime's GroupQueryAttention takes several new tokens
over a cache only at batch 1, so rows run one at a time (each its own batch-1 streams).

Two loops run a round. The plain one feeds tokens from the host and reads each pass's logits back. The
captured one (`captured`, where both depths have the fixed-width step that chooses its own ids: CUDA by
default) runs the draft's steps as the plain greedy decode runs them (CUDA graphs, queued back to back,
only their ids read), the verify pass as a graph of its own per K (`SharedCacheStream.verify`), and rolls
back by uploading one mask: the host waits twice per round (the drafted ids, the verified ids), never
per token, and no logits leave the device. After a round that kept every draft, the draft's two pending
tokens run in one such pass of its own, so that every round is K draft passes.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from .base import greedy_tokens

MAX_DRAFT_TOKENS = 16


@dataclass
class SpeculativeRun:
    tokens: list[list[int]]            # per row: the new tokens (cut after the first EOS when one is given)
    draft: str
    verify: str
    draft_tokens: int                  # K
    rounds: int = 0                    # verify passes
    drafted: int = 0                   # draft tokens the verify passes judged
    draft_passes: int = 0              # the draft's passes in rounds (a step, or the pending tokens in one pass)
    accepted: int = 0                  # of them, kept
    prefill_seconds: float = 0.0       # both depths' prompt passes
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    row_seconds: list[float] = field(default_factory=list)
    captured: bool = False             # the captured loop (else the plain one)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verify(self) -> float:
        """Tokens kept per full-depth pass (the prefill's first token not counted)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def decode_seconds(self) -> float:
        return self.draft_seconds + self.verify_seconds

    def summary(self) -> dict:
        return {"draft": self.draft, "verify": self.verify, "draft_tokens": self.draft_tokens, "rounds": self.rounds,
                "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": round(self.acceptance_rate, 4), "tokens_per_verify": round(self.tokens_per_verify, 4),
                "mean_draft_tokens": round(self.drafted / self.rounds, 4) if self.rounds else 0.0,
                "draft_passes": self.draft_passes, "loop": "captured" if self.captured else "plain",
                "prefill_seconds": round(self.prefill_seconds, 6), "draft_seconds": round(self.draft_seconds, 6),
                "verify_seconds": round(self.verify_seconds, 6)}


def check_draft(runtime, draft: str, draft_tokens: int, verify: str | None = None) -> str:
    """The verify depth for drafting with `draft` over `runtime`, or one line saying why not."""
    if not hasattr(runtime, "decoders"):
        raise UserError("speculative decoding needs a multi-depth export (ulsexport onnx --speedups 1,2 ...): "
                        "the draft and the full depth share its weights")
    verify = verify or runtime.default
    if draft == verify:
        raise UserError(f"the draft depth '{draft}' is the depth it would be verified by; choose a pruned depth "
                        f"({', '.join(d for d in runtime.depths if d != verify)})")
    if not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise UserError(f"--draft-tokens {draft_tokens} must be between 1 and {MAX_DRAFT_TOKENS}")
    runtime.decoder(draft), runtime.decoder(verify)   # an unknown depth is refused, naming the export's
    return verify


def can_capture(drafter, verifier) -> bool:
    """Whether both depths have the fixed-width step that chooses its own ids (the captured loop's)."""
    return all(d.fixed_width and d.device_argmax for d in (drafter, verifier))


def multi_token_capture_off(runtime, draft: str, verify: str) -> str | None:
    """Why passes of several tokens (the verify pass; the draft's pending tokens) ran uncaptured, or None."""
    for depth in (verify, draft):
        why = runtime.decoder(depth).verify_capture_off
        if why:
            return why if depth == verify else f"the draft's: {why}"
    return None


def speculative_greedy(runtime, input_ids, attention_mask, new_tokens: int, draft: str, draft_tokens: int = 4,
                       verify: str | None = None, eos_id: int | None = None, adaptive: bool = False,
                       captured: bool | None = None) -> SpeculativeRun:
    """`new_tokens` greedy tokens per row of the `verify` depth (default: the export's default graph, the
    full depth), drafted `draft_tokens` at a time by the `draft` depth. With `eos_id` a row stops after its
    first EOS. `adaptive` chooses K each round, at most `draft_tokens` (`SpeculativeRow.choose_k`).
    `runtime` is a MultiDepthDecoder; `captured` (default: where both depths can) runs the captured loop,
    whose streams take the depths' fixed-width buffers, one row after another."""
    verify = check_draft(runtime, draft, draft_tokens, verify)
    if new_tokens < 1:
        raise UserError(f"new tokens {new_tokens} must be at least 1")
    drafter, verifier = runtime.decoder(draft), runtime.decoder(verify)
    able = can_capture(drafter, verifier)
    if captured and not able:
        raise UserError("the captured speculative loop needs both depths' fixed-width step that chooses its own ids "
                        "(a shared-cache export on CUDA)")
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask).astype(bool)
    run = SpeculativeRun([], draft, verify, draft_tokens, captured=able if captured is None else captured)
    for row in range(len(ids)):
        start = time.perf_counter()
        stream = SpeculativeRow(drafter, verifier, ids[row][mask[row]], new_tokens, draft_tokens, run, adaptive,
                                captured=run.captured)
        while not stream.done and not (eos_id is not None and eos_id in stream.tokens):
            stream.advance()
        out = stream.tokens[:new_tokens]
        run.tokens.append(out[:out.index(eos_id) + 1] if eos_id is not None and eos_id in out else out)
        run.row_seconds.append(time.perf_counter() - start)
    return run


class SpeculativeRow:
    """One prompt's self-speculative decoding, a round at a time (`advance`), so that a loop serving other
    requests can interleave it (the plain loop's rows only: a `captured` row takes its depths' fixed-width
    buffers of one row, which any other captured row or fixed-width stream of those depths would overwrite);
    `tokens` are the verify depth's greedy tokens so far (the prefill's first, then 1 to K + 1 per round),
    `run` collects the counts and times."""

    def __init__(self, drafter, verifier, prompt, new_tokens: int, draft_tokens: int, run: SpeculativeRun | None = None,
                 adaptive: bool = False, captured: bool = False):
        self.new_tokens, self.k_max, self.adaptive, self.captured = new_tokens, draft_tokens, adaptive, captured
        self.step_seconds: list[float] = []      # per draft step, per verify pass (adaptive K's costs)
        self.verify_seconds: list[float] = []
        self.judged = self.kept_drafts = 0
        self.run = run or SpeculativeRun([], "", "", draft_tokens)
        prompt = np.asarray(prompt, np.int64).reshape(1, -1)
        capacity = new_tokens + draft_tokens + 1      # a verify pass may run K past the last token kept
        ones = np.ones_like(prompt)
        started = time.perf_counter()
        # the plain loop runs uncaptured where the session captures its steps; the captured one takes the
        # depths' fixed-width buffers of one row
        self.full, logits = verifier.prefill(prompt, ones, capacity, plain=not captured)
        self.small, _ = drafter.prefill(prompt, ones, capacity, plain=not captured)
        self.run.prefill_seconds += time.perf_counter() - started
        self.tokens = [int(greedy_tokens(np.asarray(logits))[0])]
        self.pending = [self.tokens[-1]]               # kept tokens the draft has not run yet

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.new_tokens

    def advance(self) -> list[int]:
        """One round: K drafted tokens, one verify pass, both caches rolled back; the tokens it keeps."""
        run, small, full = self.run, self.small, self.full
        k = min(self.choose_k() if self.adaptive else self.k_max, self.new_tokens - len(self.tokens))
        started = time.perf_counter()
        draft_start = small.length
        drafted = self._draft_captured(k) if self.captured else self._draft(k)
        middle = time.perf_counter()
        verify_start = full.length
        block = [self.tokens[-1], *drafted]
        if self.captured:
            chosen = full.verify(block)
        else:
            chosen = greedy_tokens(np.asarray(full.feed(np.array([block], np.int64)))[0])
        n = 0
        while n < k and drafted[n] == int(chosen[n]):
            n += 1
        kept = drafted[:n] + [int(chosen[n])]
        full.truncate(verify_start + 1 + n)           # the last kept token and the n accepted drafts
        if n < k:
            small.truncate(draft_start + len(self.pending) + n)
            self.pending = [kept[-1]]
        else:                                         # all accepted: the draft still has to run the last of them
            self.pending = [drafted[-1], kept[-1]]
        run.draft_seconds += middle - started
        run.verify_seconds += time.perf_counter() - middle
        run.rounds += 1
        run.drafted += k
        run.accepted += n
        self.step_seconds.append((middle - started) / k)
        self.verify_seconds.append(time.perf_counter() - middle)
        self.judged, self.kept_drafts = self.judged + k, self.kept_drafts + n
        self.tokens.extend(kept)
        return kept

    def _draft(self, k: int) -> list[int]:
        """The plain loop's K draft tokens: the pending tokens in one pass, then one token a pass, each pass's
        logits read on the host."""
        drafted, step = [], np.array([self.pending], np.int64)
        for _ in range(k):
            drafted.append(int(greedy_tokens(np.asarray(self.small.feed(step))[0, -1])))
            step = np.array([[drafted[-1]]], np.int64)
        self.run.draft_passes += k
        return drafted

    def _draft_captured(self, k: int) -> list[int]:
        """The captured loop's K draft tokens: fixed-width steps, queued as many at a time as the step's buffers
        allow (the host waits once per queue). After a round that kept every draft, the two pending tokens (the
        last draft, which the draft has not run, and the full depth's token) run in one pass through verify
        buffers of the draft's own, whose last choice is the first draft: K passes a round either way, where
        a step for each pending token would make K + 1."""
        small, drafted = self.small, []
        if len(self.pending) > 1:
            drafted.append(int(small.verify(self.pending)[-1]))
        passes = 1 if drafted else 0
        while len(drafted) < k:
            steps = min(k - len(drafted), len(small.buffers.ids) - 1)
            token = drafted[-1] if drafted else self.pending[-1]
            drafted.extend(int(ids[0]) for ids in small.decode(np.array([token], np.int64), steps))
            passes += steps
        self.run.draft_passes += passes
        return drafted

    def choose_k(self) -> int:
        """Adaptive K: the number of drafts that maximises the expected tokens kept per second, from this
        row's running acceptance rate a (tokens kept per round, if each draft is kept with chance a after
        the ones before it: (1 - a^(K+1)) / (1 - a)) and its measured costs (K draft steps and one verify
        pass: the medians so far). The first round drafts `draft_tokens`."""
        if not self.judged:
            return self.k_max
        a = min(self.kept_drafts / self.judged, 0.999)
        step, verify = statistics.median(self.step_seconds[-16:]), statistics.median(self.verify_seconds[-16:])
        return max(range(1, self.k_max + 1), key=lambda k: (1 - a ** (k + 1)) / (1 - a) / (k * step + verify))
