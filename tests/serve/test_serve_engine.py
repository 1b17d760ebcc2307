"""Continuous batching under the real Triton server (`triton --batching continuous`, the CPU default): the
streaming model hands each request to the decode engine's loop and returns, so a short request that arrives
while a long one decodes is answered before the long one ends; a client that goes away frees its slot; the
engine's metrics are on /metrics. One kjv16 export at 1,2 serves the module (stories260K decodes its 512
positions in a few milliseconds, too fast for a request to arrive while another runs)."""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from conftest import KJV16  # noqa: E402
from test_serve import CLIENT_MISSING, SERVER_MISSING, cli, serving  # noqa: E402

EOS = 2   # kjv16
PROMPTS = ["In the beginning", "And the LORD said unto Moses", "Blessed are the poor in spirit", "And it came to pass",
           "The LORD is my shepherd", "Jesus wept", "For God so loved the world, that he gave", "Let there be light"]


LONG = 480   # tokens of the long request: most of kjv16's 512 positions


@pytest.fixture(scope="module")
def served(tmp_path_factory, kjv16_multi_depth):
    if SERVER_MISSING or CLIENT_MISSING:
        pytest.skip(SERVER_MISSING or CLIENT_MISSING)
    from ulsexport.runtime import open_runtime

    root = tmp_path_factory.mktemp("engine")
    onnx = kjv16_multi_depth
    result = cli("triton", "--model", onnx, "--out", root / "repo", "--name", "stories", "--max-batch", "4",
                 "--batching", "continuous", "--draft-depth", "2x", "--draft-tokens", "3")
    assert result.exit_code == 0, result.output
    runtime = open_runtime(onnx, "ort")
    with serving(root / "repo", root) as server:
        server.runtime = runtime
        yield server


def _alone(runtime, ids, n, depth="full"):
    a = np.array([ids], np.int64)
    out = [int(t) for t in runtime.greedy(a, np.ones_like(a), n, depth=depth).tokens[0]]
    return out[:out.index(EOS) + 1] if EOS in out else out


def _stream(server, body, events: list, stamps: dict, key, started: threading.Event | None = None):
    """POST generate_stream; every event's ids appended to `events`; `started` set at the first event; the
    end's time in stamps[key]."""
    request = urllib.request.Request(server.url + "/v2/models/stories_stream/generate_stream",
                                     data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            if line.startswith(b"data: "):
                event = json.loads(line[len(b"data: "):])
                assert "error" not in event, event
                events.extend(event["output_ids"] if isinstance(event["output_ids"], list) else [event["output_ids"]])
                if started is not None:
                    started.set()
    stamps[key] = time.monotonic()


def _metric(server, name, model="stories_stream") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=10).read().decode()
    match = re.search(rf'^{name}{{model="{model}"}} ([0-9.e+-]+)$', text, re.M)
    assert match, f"{name} for {model} is not on /metrics"
    return float(match.group(1))


def test_a_short_request_is_answered_while_a_long_one_decodes(served):
    """A long request (LONG tokens), and once its stream has begun a short one (4 tokens): the short one ends
    first; both are their greedy tokens. (A tiny model decodes 200 tokens here in a few milliseconds, so the short one
    is sent at the long one's first token rather than 0.2 s after it; kjv16 takes about 0.5 s for LONG.)"""
    long_ids = next(ids for ids in ([5, 6, 7], [9, 10], [20, 30, 40], [11])
                    if len(_alone(served.runtime, ids, LONG)) == LONG)
    events = {"long": [], "short": []}
    stamps: dict = {}
    started = threading.Event()
    threads = [threading.Thread(target=_stream, args=(served, {"input_ids": long_ids, "max_tokens": LONG},
                                                      events["long"], stamps, "long", started))]
    threads[0].start()
    assert started.wait(60)
    threads.append(threading.Thread(target=_stream, args=(served, {"input_ids": [5, 9], "max_tokens": 4, "depth": "2x"},
                                                          events["short"], stamps, "short")))
    threads[1].start()
    for t in threads:
        t.join(120)
    assert stamps["short"] < stamps["long"], (stamps, len(events["long"]))
    assert events["long"] == _alone(served.runtime, long_ids, LONG)
    assert events["short"] == _alone(served.runtime, [5, 9], 4, "2x")


def test_sixteen_clients_of_mixed_lengths_and_depths_get_their_own_answers(served):
    tokenizer_ids = {p: _prompt_ids(served, p) for p in PROMPTS}
    answers, failures = {}, []

    def client(t):
        for k in range(4):
            prompt, n, depth = PROMPTS[(t + k) % len(PROMPTS)], 3 + (t * 7 + k * 5) % 30, ("full", "2x")[(t + k) % 2]
            got, stamps = [], {}
            try:
                _stream(served, {"text_input": prompt, "max_tokens": n, "depth": depth}, got, stamps, 0)
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(repr(exc))
            answers[t, k] = (prompt, n, depth, got)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not failures, failures[:3]
    assert len(answers) == 64
    for (prompt, n, depth, got) in answers.values():
        assert got == _alone(served.runtime, tokenizer_ids[prompt], n, depth), (prompt, n, depth)


def _prompt_ids(served, prompt):
    from ulsexport.tokenizer import load_tokenizer

    return list(load_tokenizer(KJV16)(prompt).input_ids)


def test_a_disconnected_stream_frees_its_slot_and_none_leak_over_500_requests(served):
    long_ids = next(ids for ids in ([5, 6, 7], [9, 10], [20, 30, 40], [11]) if len(_alone(served.runtime, ids, 200)) == 200)
    before = _metric(served, "ulsexport_generated_tokens_total")
    request = urllib.request.Request(served.url + "/v2/models/stories_stream/generate_stream",
                                     data=json.dumps({"input_ids": long_ids, "max_tokens": 200}).encode())
    response = urllib.request.urlopen(request, timeout=60)
    assert response.readline().startswith(b"data: ")
    response.close()   # the client goes away after its first token
    deadline = time.monotonic() + 60
    while _metric(served, "ulsexport_running_requests") > 0:
        assert time.monotonic() < deadline, "the disconnected stream's slot was never freed"
        time.sleep(0.1)
    assert _metric(served, "ulsexport_generated_tokens_total") - before < 150   # it stopped well before 200
    # 500 short requests over 4 slots, 8 clients at a time: every one answered, no slot left taken
    done, failures = [], []

    def client(t):
        for k in range(500 // 8 + 1):
            i = t + 8 * k
            if i >= 500:
                return
            got, stamps = [], {}
            try:
                _stream(served, {"input_ids": [3 + i % 50, 4 + i % 7], "max_tokens": 1 + i % 3, "stream": i % 2 == 0},
                        got, stamps, 0)
                done.append(len(got))
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not failures, failures[:3]
    assert len(done) == 500 and all(n >= 1 for n in done)
    # a request's last token reaches its client before the engine's loop frees the slot and updates the gauges:
    # give the loop a moment to settle, then no slot may still be taken
    deadline = time.monotonic() + 5
    while (_metric(served, "ulsexport_running_requests") or _metric(served, "ulsexport_queue_requests")) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(served, "ulsexport_running_requests") == 0 and _metric(served, "ulsexport_queue_requests") == 0
    assert _metric(served, "ulsexport_first_tokens_total") >= 500
    assert _metric(served, "ulsexport_time_to_first_token_seconds_total") > 0


def test_speculative_requests_get_the_full_depths_tokens(served):
    """"depth": "speculative": drafted by 2x (K = 3), verified at full: the full depth's greedy tokens, streamed
    and answered once alike, beside plain requests."""
    for prompt in PROMPTS[:3]:
        ids = _prompt_ids(served, prompt)
        want = _alone(served.runtime, ids, 40)
        got, stamps = [], {}
        _stream(served, {"text_input": prompt, "max_tokens": 40, "depth": "speculative"}, got, stamps, 0)
        assert got == want, prompt
        status, text = served.post("/v2/models/stories/generate",
                                   {"text_input": prompt, "max_tokens": 40, "depth": "speculative"})
        reply = json.loads(text)
        assert status == 200 and (reply["output_ids"] if isinstance(reply["output_ids"], list)
                                  else [reply["output_ids"]]) == want, text


def test_speculative_needs_a_draft_depth(kjv16_multi_depth, tmp_path):
    from ulsexport.serve.generate_model import Generator, RequestError

    generator = Generator(kjv16_multi_depth, batching="continuous")
    with pytest.raises(RequestError, match="no draft depth"):
        generator.prompt("In the beginning", depth="speculative")
    for args, message in [(["--draft-depth", "full", "--batching", "continuous"], "one of its pruned depths (2x)"),
                          (["--draft-depth", "2x", "--batching", "static"], "add --batching continuous"),
                          (["--draft-depth", "2x", "--batching", "continuous", "--draft-tokens", "0"], "between 1 and 16")]:
        result = cli("triton", "--model", kjv16_multi_depth, "--out", tmp_path / "r", *args)
        assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "r").exists()
