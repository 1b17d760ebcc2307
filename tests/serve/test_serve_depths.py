"""Serving a multi-depth export (`ulsexport onnx --speedups 1,2`): each request names its depth in the
optional `depth` input, one execute() decodes each depth's requests as its own batch, and every answer
is that depth's greedy tokens: the ONNX graph's alone, and the pruned checkpoint's in PyTorch.

One stories260K export at 1,2 serves the whole module (the Generator tests and the real server). The
server test skips when the nvidia-pytriton wheel or tritonclient is missing; the server is always
stopped (the `serving` context of test_serve).
"""
from __future__ import annotations

import json
import re
import threading
import urllib.request

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from conftest import STORIES  # noqa: E402
from test_serve import CLIENT_MISSING, EOS, PROMPTS, SERVER_MISSING, cli, ids_of, serving  # noqa: E402

DEPTHS = ["full", "2x"]


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """stories260K exported at 1,2 (one graph per depth over one weights file), and the 2x prune."""
    from ulsexport.export.multi_depth import export_multi_depth
    from ulsexport.prune import plan_for_model, prune_checkpoint

    root = tmp_path_factory.mktemp("depths")
    out = export_multi_depth(STORIES, root / "multi", [1, 2], quiet=True).out_dir
    pruned = prune_checkpoint(STORIES, root / "pruned-2x", plan_for_model(STORIES, 2), quiet=True).out_dir
    return {"root": root, "onnx": out, "checkpoints": {"full": STORIES, "2x": pruned}}


@pytest.fixture(scope="module")
def expected(multi):
    """expected(depth, prompt, n): the ORT graph's greedy tokens at that depth, checked equal to the
    checkpoint's in PyTorch (the original for full, the 2x prune for 2x), cut after the first eos."""
    from ulsexport.tokenizer import load_tokenizer
    from ulsexport.runtime import open_runtime

    ort = open_runtime(multi["onnx"], "ort")
    torch_rts = {d: open_runtime(c, "torch", "fp32") for d, c in multi["checkpoints"].items()}
    tokenizer, cache = load_tokenizer(multi["onnx"]), {}

    def cut(tokens):
        out = [int(t) for t in tokens]
        return out[:out.index(EOS) + 1] if EOS in out else out

    def tokens(depth, prompt, n):
        key = (depth, prompt, n)
        if key not in cache:
            a = np.array([tokenizer(prompt).input_ids], np.int64)
            got = cut(ort.greedy(a, np.ones_like(a), n, depth=depth).tokens[0])
            assert got == cut(torch_rts[depth].greedy(a, np.ones_like(a), n).tokens[0]), key
            cache[key] = got
        return cache[key]

    return tokens


def request(t, k):
    """Client t's k-th request: (depth, prompt, max_tokens); depths alternate within and across clients."""
    return DEPTHS[(t + k) % 2], PROMPTS[(2 * t + k) % len(PROMPTS)], 4 + (t * 5 + k * 3) % 9


# -- Generator, without a server ------------------------------------------------------------------
def test_generator_decodes_each_depth_as_its_own_batch(multi, expected):
    from ulsexport.serve.generate_model import Generator, RequestError

    generator = Generator(multi["onnx"], max_tokens=64)
    assert generator.multi_depth and generator.depths == DEPTHS and generator.default_depth == "full"
    keys = [(DEPTHS[i % 2], p, 4 + 2 * i) for i, p in enumerate(PROMPTS)]
    prompts = [generator.prompt(p, max_tokens=n, depth=np.array([[d.encode()]], dtype=object)) for d, p, n in keys]
    seen = []
    steps = generator.decode(prompts, on_token=lambda row, p, token: seen.append((row, token)))
    assert steps > 0 and list(generator.groups(prompts)) == DEPTHS
    for row, ((depth, text, n), p) in enumerate(zip(keys, prompts)):
        assert p.depth == depth and p.new_ids == expected(depth, text, n), (depth, text)
        assert [t for r, t in seen if r == row] == p.new_ids  # on_token's row is the row in `prompts`
    # the depths differ somewhere, so the routing is seen; left out or "default" is the default graph
    assert any(expected("full", p, 12) != expected("2x", p, 12) for p in PROMPTS)
    plain, alias = generator.prompt(PROMPTS[0], max_tokens=12), generator.prompt(PROMPTS[0], max_tokens=12, depth="default")
    generator.decode([plain, alias])
    assert plain.depth == alias.depth == "full" and plain.new_ids == alias.new_ids == expected("full", PROMPTS[0], 12)
    with pytest.raises(RequestError, match=r"no depth '3x' in this model; it serves: full, 2x \(default full"):
        generator.prompt("Once", depth="3x")


# -- the real server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(multi):
    if SERVER_MISSING or CLIENT_MISSING:
        pytest.skip(SERVER_MISSING or CLIENT_MISSING)
    repo = multi["root"] / "triton"
    result = cli("triton", "--model", multi["onnx"], "--out", repo, "--name", "stories", "--max-batch", "8",
                 "--queue-delay-us", "20000")
    assert result.exit_code == 0, result.output
    manifest = json.loads((repo / "ulsexport.json").read_text())
    assert manifest["multi_depth"] and manifest["default_depth"] == "full"
    assert [(d["tag"], d["kept"]) for d in manifest["depths"]] == [("full", [0, 1, 2, 3, 4]), ("2x", [0, 4])]
    assert 'name: "depth" data_type: TYPE_STRING' in (repo / "models" / "stories" / "config.pbtxt").read_text()
    with serving(repo, multi["root"]) as served:
        yield served


@pytest.mark.skipif(SERVER_MISSING is not None or CLIENT_MISSING is not None,
                    reason=SERVER_MISSING or CLIENT_MISSING or "")
def test_server_routes_concurrent_requests_by_depth(server, expected):
    import tritonclient.http as httpclient

    threads_n, per_client = 6, 3
    keys = {request(t, k) for t in range(threads_n) for k in range(per_client)}
    for depth, prompt, n in sorted(keys):  # alone, one at a time: that depth's tokens
        status, reply = server.generate({"text_input": prompt, "max_tokens": n, "depth": depth})
        assert status == 200 and ids_of(reply) == expected(depth, prompt, n), (depth, prompt, reply)
    status, reply = server.generate({"text_input": PROMPTS[0], "max_tokens": 12})  # no depth: the default graph
    assert status == 200 and ids_of(reply) == expected("full", PROMPTS[0], 12)
    status, body = server.post("/v2/models/stories_stream/generate_stream",
                               {"text_input": PROMPTS[2], "max_tokens": 9, "depth": "2x"})
    events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
    assert status == 200 and [t for e in events for t in ids_of(e)] == expected("2x", PROMPTS[2], 9)

    answers, errors, barrier = {}, [], threading.Barrier(threads_n)

    def client(t):
        try:
            c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}", network_timeout=120)
            barrier.wait(timeout=60)
            for k in range(per_client):
                depth, prompt, n = request(t, k)
                inputs = [httpclient.InferInput("text_input", [1, 1], "BYTES"),
                          httpclient.InferInput("max_tokens", [1, 1], "INT64"),
                          httpclient.InferInput("depth", [1, 1], "BYTES")]
                inputs[0].set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
                inputs[1].set_data_from_numpy(np.array([[n]], np.int64))
                inputs[2].set_data_from_numpy(np.array([[depth.encode()]], dtype=np.object_))
                answers[(t, k)] = c.infer("stories", inputs).as_numpy("output_ids")[0].tolist()
            c.close()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"client {t}: {exc!r}")

    threads = [threading.Thread(target=client, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(answers) == threads_n * per_client, errors
    for (t, k), got in answers.items():
        assert got == expected(*request(t, k)), (t, k, request(t, k))
    # side by side: some execute() call held requests of both depths
    mixed = re.findall(r"stories: execute batch of \d+ requests \(\d+ valid; (full x\d+, 2x x\d+|2x x\d+, full x\d+)\)",
                       server.log.read_text())
    assert mixed, "no execute() call held both depths"


@pytest.mark.skipif(SERVER_MISSING is not None or CLIENT_MISSING is not None,
                    reason=SERVER_MISSING or CLIENT_MISSING or "")
def test_unknown_depth_is_refused_with_the_depths_served(server, expected):
    for model in ("stories", "stories_stream"):
        status, text = server.post(f"/v2/models/{model}/generate",
                                   {"text_input": "Once upon a time", "max_tokens": 3, "depth": "3x", "stream": False})
        error = json.loads(text)["error"]
        assert status == 400 and "no depth '3x' in this model; it serves: full, 2x (default full" in error, text
    assert server.ready()
    with urllib.request.urlopen(server.url + "/v2/health/ready", timeout=10) as r:
        assert r.status == 200
    status, reply = server.generate({"text_input": PROMPTS[0], "max_tokens": 5, "depth": "2x"})
    assert status == 200 and ids_of(reply) == expected("2x", PROMPTS[0], 5)
