"""The continuous-batching decode engine (`runtime.decode_engine`): each request's tokens are the ones
`greedy` gives it alone, whatever runs beside it; a request joins the running batch at the next step;
the stop policy (EOS, max_tokens, cancellation) frees slots, and none leaks."""
import threading
import time

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from ulsexport.errors import UserError  # noqa: E402
from ulsexport.runtime.decode_engine import DecodeEngine, Request  # noqa: E402
from ulsexport.runtime.ort import MultiDepthDecoder  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models on one thread (conftest's one_thread)."""


@pytest.fixture(scope="module")
def runtime(multi_depth_exports):
    return MultiDepthDecoder(multi_depth_exports("shared")[1], "cpu")


def _alone(runtime, request):
    ids = np.array([request.prompt], np.int64)
    tokens = runtime.greedy(ids, np.ones_like(ids), request.max_tokens, depth=request.depth).tokens[0].tolist()
    for i, token in enumerate(tokens):
        if token in request.eos:
            return tokens[:i + 1]
    return tokens


def _requests(count, seed=0, depths=("full", "2x", "3x"), eos=frozenset()):
    rng = np.random.default_rng(seed)
    return [Request(rng.integers(3, 128, int(rng.integers(1, 24))).tolist(), int(rng.integers(1, 40)),
                    depth=depths[i % len(depths)], eos=eos) for i in range(count)]


def test_each_request_gets_its_own_greedy_tokens_whatever_runs_beside_it(runtime):
    engine = DecodeEngine(runtime, slots=3, capacity=96)
    requests = engine.run(_requests(16))
    for request in requests:
        assert request.tokens == _alone(runtime, request), request
        assert request.finish_reason == "length" and request.first_token_at <= request.finished_at
    assert all(s.running() == [] for s in engine.depths.values()) and not engine.waiting


def test_eos_stops_a_request_and_frees_its_slot(runtime):
    probe = _requests(6, seed=3, depths=("2x",))
    eos = frozenset({_alone(runtime, probe[0])[2]})     # a token the first request makes third
    requests = DecodeEngine(runtime, slots=2, capacity=96).run(_requests(6, seed=3, depths=("2x",), eos=eos))
    assert requests[0].finish_reason == "eos" and len(requests[0].tokens) <= 3
    for request in requests:
        assert request.tokens == _alone(runtime, request)


def test_a_short_request_is_answered_while_a_long_one_runs(runtime):
    """The long request (200 tokens) is running when the short one (4 tokens) arrives; the short one joins
    the running batch and finishes first, and the long one's tokens are unchanged."""
    engine = DecodeEngine(runtime, slots=4, capacity=256)
    stop = threading.Event()
    loop = threading.Thread(target=engine.run_forever, args=(stop,), daemon=True)
    loop.start()
    try:
        long = engine.add(Request(list(range(3, 13)), 200))
        while len(long.tokens) < 20:
            time.sleep(0.001)
        short = engine.add(Request([5, 6, 7], 4, depth="3x"))
        while not (long.done and short.done):
            time.sleep(0.005)
    finally:
        stop.set()
        loop.join(5)
    assert short.finished_at < long.finished_at and len(short.tokens) == 4 and len(long.tokens) == 200
    assert long.tokens == _alone(runtime, long) and short.tokens == _alone(runtime, short)


def test_cancelled_requests_free_their_slots_and_none_leak_after_500(runtime):
    engine = DecodeEngine(runtime, slots=4, capacity=64)
    requests = []
    for i, request in enumerate(_requests(500, seed=5)):
        request.max_tokens = 1 + request.max_tokens % 6
        if i % 7 == 0:
            request.on_token = lambda r, token: engine.cancel(r)   # a client that goes away after one token
        requests.append(engine.add(request))
        if i % 16 == 15:
            while engine.has_work():
                engine.step()
    while engine.has_work():
        engine.step()
    assert all(r.done for r in requests) and not engine.waiting
    assert all(s.running() == [] for s in engine.depths.values())
    cancelled = [r for i, r in enumerate(requests) if i % 7 == 0]
    assert all(r.finish_reason in ("cancelled", "length") and len(r.tokens) <= 2 for r in cancelled)
    for request in requests[1:40:6]:
        assert request.tokens == _alone(runtime, request)
    waiting = engine.add(Request([3, 4], 5))
    engine.cancel(waiting)        # cancelled before it was admitted: never starts
    engine.step()
    assert waiting.finish_reason == "cancelled" and waiting.tokens == []


def test_bad_requests_and_exports_are_refused(runtime, multi_depth_exports):
    engine = DecodeEngine(runtime, slots=1, capacity=16)
    for request, message in [(Request([1, 2], 15), "pass the engine's 16 positions"),
                             (Request([1], 3, depth="9x"), "no depth '9x'"),
                             (Request([], 3), "empty"), (Request([1], 0), "at least 1")]:
        with pytest.raises(UserError, match=message):
            engine.add(request)
    with pytest.raises(UserError, match="shared KV cache"):
        DecodeEngine(MultiDepthDecoder(multi_depth_exports("concat")[1], "cpu"))


def test_speculative_requests_get_the_full_depths_tokens_beside_the_others(runtime):
    """An engine with a draft depth: speculative requests (drafted by 3x, K = 3, verified at full) run beside
    plain ones of every depth; each gets exactly the tokens `greedy` gives it alone at its depth."""
    engine = DecodeEngine(runtime, slots=2, capacity=96, draft="3x", draft_tokens=3)
    requests = _requests(9, seed=7)
    for request in requests[::3]:
        request.speculative, request.depth = True, "full"
    cancelled = Request([4, 5, 6], 30, speculative=True, on_token=lambda r, token: engine.cancel(r))
    engine.run(requests + [cancelled])
    for request in requests:
        assert request.tokens == _alone(runtime, request), request
        assert request.finish_reason == "length"
    assert cancelled.finish_reason == "cancelled" and 1 <= len(cancelled.tokens) <= 4
    assert not engine.speculating and engine.running() == 0
    with pytest.raises(UserError, match="no draft depth"):
        DecodeEngine(runtime).add(Request([1], 2, speculative=True))
    with pytest.raises(UserError, match="is the depth it would be verified by"):
        DecodeEngine(runtime, draft="full")


def test_prompts_admitted_together_are_prefilled_in_one_pass(runtime, multi_depth_exports, monkeypatch):
    """Where the graph chooses the ids, the prompts admitted in one step into consecutive slots of a depth run as
    one right-padded pass (only the chosen ids read back), and each request still gets its greedy tokens alone;
    a request admitted later, into a slot apart, is prefilled by itself."""
    from ulsexport.runtime.decode_engine import _consecutive, _Slots

    fixed = MultiDepthDecoder(multi_depth_exports("shared")[1], "cpu", fixed_width=True)
    engine = DecodeEngine(fixed, slots=4, capacity=96)
    passes, original = [], _Slots._run_choosing
    monkeypatch.setattr(_Slots, "_run_choosing",
                        lambda self, binding, ids, mask: passes.append(ids.shape) or original(self, binding, ids, mask))
    requests = _requests(6, seed=3, depths=("full",))    # 4 slots: 4 admitted at once (lengths differ), then 2
    engine.run(requests)
    for request in requests:
        assert request.tokens == _alone(runtime, request), request
    assert passes[0][0] == 4 and len({len(r.prompt) for r in requests[:4]}) > 1, passes
    assert len(passes) < len(requests)
    # the runs: per depth, consecutive slots only
    a, b = engine.depths["full"], engine.depths["2x"]
    runs = list(_consecutive([(requests[0], a, 0), (requests[1], a, 1), (requests[2], a, 3), (requests[3], None, None),
                              (requests[4], b, 0)]))
    assert [(slots, [slot for _, slot in run]) for slots, run in runs] == [(a, [0, 1]), (a, [3]), (b, [0])]


@pytest.mark.parametrize("device_argmax", [False, True])
def test_the_fixed_width_step_gives_the_same_tokens(runtime, multi_depth_exports, device_argmax):
    """The engine over decoders with the fixed-width step (what CUDA graphs capture; here run uncaptured on the
    CPU): ids, a mask as wide as the cache and the logits at fixed addresses, batch sizes rounded up to powers
    of two, the ids chosen by the host from the logits or (device_argmax, CUDA's default) by the graph, only
    they read back; every request's tokens are its greedy tokens alone, speculative ones included."""
    fixed = MultiDepthDecoder(multi_depth_exports("shared")[1], "cpu", fixed_width=True, device_argmax=device_argmax)
    assert all(d.fixed_width and d.device_argmax == device_argmax for d in fixed.decoders.values())
    engine = DecodeEngine(fixed, slots=3, capacity=96, draft="3x", draft_tokens=2)
    requests = _requests(12, seed=11)
    requests[0].speculative, requests[0].depth = True, "full"
    engine.run(requests)
    for request in requests:
        assert request.tokens == _alone(runtime, request), request
    sizes = [set(s.step_bindings) for s in engine.depths.values()]
    assert set().union(*sizes) <= {1, 2, 3} and any(len(used) > 1 for used in sizes), sizes   # 3 slots: 4 -> 3
    assert all(s.device_argmax == device_argmax for s in engine.depths.values())
