"""Serving with Triton: `ulsexport triton` writes a model repository, `ulsexport serve` runs the real
tritonserver (nvidia-pytriton wheel) over it, and clients (tritonclient HTTP and gRPC, plain HTTP
JSON) get the pruned checkpoint's greedy tokens, batched, streamed, and refused with reasons.

The server tests skip when the wheel or tritonclient is missing. The server is always stopped
(module fixture, try/finally), on ports free at run time, bound to 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import STORIES, run_cli

from ulsexport.serve.server import available
from ulsexport.testing import free_ports

PROMPTS = ["Once upon a time", "The cat", "Lily and Ben went to the park to play with a ball", "One day",
           "He said hello to the big dog and", "Tom", "She was very happy because her mom gave her", "A bird"]
EOS = 2  # stories260K

SERVER_MISSING = available()
try:
    import tritonclient.grpc  # noqa: F401
    import tritonclient.http  # noqa: F401
    CLIENT_MISSING = None
except ImportError as exc:
    CLIENT_MISSING = f"tritonclient is not installed ({exc}); pip install 'tritonclient[http,grpc]' 'protobuf>=7'"
needs_client = pytest.mark.skipif(CLIENT_MISSING is not None, reason=CLIENT_MISSING or "")
needs_server = pytest.mark.skipif(SERVER_MISSING is not None or CLIENT_MISSING is not None,
                                  reason=SERVER_MISSING or CLIENT_MISSING or "")

CLI = ("import sys; from ulsexport.cli import main; from ulsexport.cli.serve import serve, triton; "
       "[main.add_command(c) for c in (serve, triton) if c.name not in main.commands]; main()")


def cli(*args):
    """run_cli with the serve commands present (registered or not yet)."""
    from ulsexport.cli import main
    from ulsexport.cli.serve import serve, triton

    for command in (serve, triton):
        if command.name not in main.commands:
            main.add_command(command)
    return run_cli(*args)


# -- artifacts ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """stories260K pruned at 2x (hf) and its ONNX export (concat cache on CPU: head size 8)."""
    from ulsexport.export.trace import export_onnx
    from ulsexport.prune import plan_for_model, prune_checkpoint

    root = tmp_path_factory.mktemp("serve")
    hf = prune_checkpoint(STORIES, root / "hf", plan_for_model(STORIES, 2), quiet=True).out_dir
    onnx = export_onnx(hf, root / "onnx", optimize=False, quiet=True).out_dir
    return {"root": root, "hf": Path(hf), "onnx": Path(onnx)}


@pytest.fixture(scope="module")
def repo(artifact):
    result = cli("triton", "--model", artifact["onnx"], "--out", artifact["root"] / "triton", "--name", "stories",
                 "--max-batch", "8", "--queue-delay-us", "5000")
    assert result.exit_code == 0, result.output
    return artifact["root"] / "triton"


@pytest.fixture(scope="module")
def reference(artifact):
    """Greedy tokens of the pruned checkpoint in PyTorch, cut after the first eos (the server stops a row there)."""
    from ulsexport.tokenizer import load_tokenizer
    from ulsexport.runtime import open_runtime

    torch_rt, tokenizer, cache = open_runtime(artifact["hf"], "torch", "fp32"), load_tokenizer(artifact["hf"]), {}

    def tokens(prompt, max_tokens: int) -> list[int]:
        ids = tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        key = (tuple(ids), max_tokens)
        if key not in cache:
            a = np.array([ids], np.int64)
            out = [int(t) for t in torch_rt.greedy(a, np.ones_like(a), max_tokens).tokens[0]]
            cache[key] = out[:out.index(EOS) + 1] if EOS in out else out
        return cache[key]

    tokens.tokenizer = tokenizer
    return tokens


# -- the repository, without a server -----------------------------------------------------------
@needs_client
def test_every_config_parses_as_model_config(repo):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    manifest = json.loads((repo / "ulsexport.json").read_text())
    assert manifest["kind"] == "triton-repository" and manifest["kept"] == [0, 4]
    assert manifest["runtime"] == "ort" and manifest["max_batch"] == 8 and manifest["max_tokens"] == 511
    assert [m["name"] for m in manifest["models"]] == ["stories", "stories_stream", "stories_step"]
    assert not manifest["multi_depth"] and manifest["default_depth"] == "default"
    assert [(d["tag"], d["kept"]) for d in manifest["depths"]] == [("default", [0, 4])]
    configs = sorted(repo.rglob("config.pbtxt"))
    assert [c.relative_to(repo).as_posix() for c in configs] == [
        "models/stories/config.pbtxt", "models/stories_stream/config.pbtxt", "onnxruntime/stories_step/config.pbtxt"]
    parsed = {c.parent.name: text_format.Parse(c.read_text(), model_config_pb2.ModelConfig()) for c in configs}
    types = model_config_pb2.DataType
    for name in ("stories", "stories_stream"):
        cfg = parsed[name]
        assert cfg.name == name and cfg.backend == "python" and cfg.max_batch_size == 8
        inputs = {i.name: i for i in cfg.input}
        assert (inputs["text_input"].data_type, list(inputs["text_input"].dims)) == (types.TYPE_STRING, [1])
        assert (inputs["input_ids"].data_type, list(inputs["input_ids"].dims)) == (types.TYPE_INT64, [-1])
        assert inputs["input_ids"].allow_ragged_batch and all(i.optional for i in cfg.input)
        assert (inputs["depth"].data_type, list(inputs["depth"].dims)) == (types.TYPE_STRING, [1])
        assert (inputs["max_tokens"].data_type, list(inputs["max_tokens"].dims)) == (types.TYPE_INT64, [1])
        outputs = {o.name: (o.data_type, list(o.dims)) for o in cfg.output}
        assert outputs == {"text_output": (types.TYPE_STRING, [1]), "output_ids": (types.TYPE_INT64, [-1])}
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 5000
        assert cfg.instance_group[0].count == 1 and cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert cfg.model_transaction_policy.decoupled == (name == "stories_stream")
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        assert params["runtime"] == "ort" and params["device"] == "cpu" and params["max_tokens"] == "511"
        assert params["cuda_graph"] == "true"  # the runtime captures where it can (CUDA); --no-cuda-graph: "false"
        assert params["batching"] == "auto" and params["decode_kernels"] == "false" and params["draft_depth"] == ""
        assert (repo / "models" / name / params["artifact"] / "model.onnx").is_file()
        assert "from ulsexport.serve.generate_model import TritonPythonModel" in (
            repo / "models" / name / "1" / "model.py").read_text()
    step = parsed["stories_step"]
    assert step.backend == "onnxruntime" and step.sequence_batching.state
    pairs = [(s.input_name, s.output_name) for s in step.sequence_batching.state]
    assert pairs == [(f"past_key_values.{i}.{kv}", f"present.{i}.{kv}") for i in range(2) for kv in ("key", "value")]
    # Triton pairs states by sorted name: both sides must sort into the same pairs
    assert sorted(pairs) == sorted(pairs, key=lambda p: p[1])
    assert all(list(s.dims) == [4, -1, 8] and len(s.initial_state) == 1
               and list(s.initial_state[0].dims) == [4, 0, 8] and s.initial_state[0].zero_data
               for s in step.sequence_batching.state)
    assert {i.name for i in step.input} == {"input_ids", "attention_mask", "position_ids"}
    assert (repo / "onnxruntime" / "stories_step" / "1" / "model.onnx").is_file()


def test_artifact_is_hard_linked_where_it_can_be(repo, artifact):
    copied = repo / "models" / "stories" / "1" / "artifact" / "model.onnx"
    assert copied.stat().st_ino == (artifact["onnx"] / "model.onnx").stat().st_ino


@pytest.mark.parametrize("args, message", [
    (["--model", "{root}/nothing"], "is not a directory"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--instances", "0"], "--instances must be at least 1"),
    (["--max-tokens", "600"], "leaves no room for a prompt"),
    (["--name", "a/b"], "--name"),
    (["--out", "{onnx}/inside"], "would overwrite the input"),
    (["--runtime", "torch"], "--runtime torch runs hf-checkpoint"),
    (["--decode-kernels"], "--decode-kernels serves with ulsexport's CUDA kernels: it needs --device cuda"),
])
def test_triton_refusals(artifact, tmp_path, args, message):
    args = [a.format(root=artifact["root"], onnx=artifact["onnx"]) for a in args]
    base = {"--model": str(artifact["onnx"]), "--out": str(tmp_path / "repo")}
    for flag in list(base):
        if flag in args:
            base.pop(flag)
    result = cli("triton", *[x for kv in base.items() for x in kv], *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "repo").exists()


def test_triton_refuses_existing_out_without_force(repo, artifact):
    result = cli("triton", "--model", artifact["onnx"], "--out", repo)
    assert result.exit_code == 2 and "already exists; pass --force" in result.output


def test_shared_cache_export_gets_no_step_model_and_says_why(artifact, tmp_path):
    import shutil

    folder = tmp_path / "shared"
    shutil.copytree(artifact["onnx"], folder)
    manifest = json.loads((folder / "ulsexport.json").read_text())
    manifest["onnx"]["kv_cache"] = "shared"
    (folder / "ulsexport.json").write_text(json.dumps(manifest))
    result = cli("triton", "--model", folder, "--out", tmp_path / "repo")
    assert result.exit_code == 0 and "no decoder-step model: the artifact's KV cache is 'shared'" in result.output
    written = json.loads((tmp_path / "repo" / "ulsexport.json").read_text())
    assert not written["step_model"]["written"] and not (tmp_path / "repo" / "onnxruntime").exists()


# -- the generate model's core, without a server ------------------------------------------------
@pytest.fixture(scope="module")
def generator(artifact):
    from ulsexport.serve.generate_model import Generator

    return Generator(artifact["onnx"], max_tokens=64)


def test_batched_rows_equal_rows_alone_and_the_reference(generator, reference):
    prompts = [generator.prompt(p, max_tokens=4 + 3 * i) for i, p in enumerate(PROMPTS)]
    generator.decode(prompts)
    for i, (text, p) in enumerate(zip(PROMPTS, prompts)):
        alone = generator.prompt(text, max_tokens=4 + 3 * i)
        generator.decode([alone])
        assert p.new_ids == alone.new_ids == reference(text, 4 + 3 * i)


def test_a_single_depth_artifact_serves_only_the_default_depth(generator):
    from ulsexport.serve.generate_model import RequestError

    assert generator.depths == ["default"] and not generator.multi_depth
    plain = generator.prompt("Once upon a time", max_tokens=4)
    named = generator.prompt("Once upon a time", max_tokens=4, depth=np.array([[b"default"]], dtype=object))
    generator.decode([plain, named])
    assert plain.depth == named.depth == "default" and plain.new_ids == named.new_ids
    with pytest.raises(RequestError, match="depth '2x': this model serves a single-depth artifact; leave depth out"):
        generator.prompt("Once", depth="2x")


def test_a_row_stops_at_eos_and_the_others_go_on(generator):
    first = generator.prompt("Once upon a time", max_tokens=12)
    generator.decode([first])
    eos_before = generator.eos
    generator.eos = {first.new_ids[2]}  # pretend the third token is eos
    try:
        stopped, other = generator.prompt("Once upon a time", max_tokens=12), generator.prompt("A bird", max_tokens=12)
        generator.decode([stopped, other])
    finally:
        generator.eos = eos_before
    assert stopped.new_ids == first.new_ids[:first.new_ids.index(first.new_ids[2]) + 1]
    assert len(other.new_ids) == 12 or other.new_ids[-1] == first.new_ids[2]


# -- the real server ----------------------------------------------------------------------------
class Served:
    def __init__(self, process, http, grpc, metrics, log, stdout):
        self.process, self.http, self.grpc, self.metrics, self.log, self.stdout = process, http, grpc, metrics, log, stdout
        self.url = f"http://127.0.0.1:{http}"

    def post(self, path, body, raw=False):
        data = body if raw else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def generate(self, body, model="stories"):
        status, text = self.post(f"/v2/models/{model}/generate", body)
        return status, json.loads(text)

    def ready(self):
        try:
            with urllib.request.urlopen(self.url + "/v2/models/stories/ready", timeout=5) as r:
                return r.status == 200 and self.process.poll() is None
        except (urllib.error.URLError, OSError):
            return False


def ids_of(reply) -> list[int]:
    ids = reply["output_ids"]
    return ids if isinstance(ids, list) else [ids]  # one element comes back as a JSON scalar


@contextlib.contextmanager
def serving(repo: Path, root: Path):
    """`ulsexport serve` over `repo` on free ports, logs under `root`; always stopped (SIGTERM, then kill)."""
    http, grpc, metrics = free_ports(3)
    log = root / "tritonserver.log"
    stdout = root / "serve.out"
    with open(stdout, "wb") as out:
        process = subprocess.Popen([sys.executable, "-c", CLI, "serve", str(repo), "--http-port", str(http),
                                    "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--log-file", str(log)],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    served = Served(process, http, grpc, metrics, log, stdout)
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops the server" not in stdout.read_text():
            assert process.poll() is None, f"ulsexport serve exited:\n{stdout.read_text()}"
            assert time.monotonic() < deadline, f"not ready:\n{stdout.read_text()}"
            time.sleep(0.2)
        yield served
    finally:
        server_pid = re.search(r"tritonserver pid (\d+)", stdout.read_text())
        process.send_signal(signal.SIGTERM)
        try:
            served.exit_code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            served.exit_code = None
        if server_pid:  # never leave the server behind, whatever happened to the CLI
            try:
                os.killpg(int(server_pid.group(1)), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def server(repo, artifact):
    """`ulsexport serve` over the repository, on free ports; always stopped (SIGTERM, then kill)."""
    if SERVER_MISSING or CLIENT_MISSING:
        pytest.skip(SERVER_MISSING or CLIENT_MISSING)
    with serving(repo, artifact["root"]) as served:
        yield served


@needs_server
def test_serve_prints_endpoints(server):
    out = server.stdout.read_text()
    assert f"http://127.0.0.1:{server.http}/v2/models/stories/generate" in out
    assert f"127.0.0.1:{server.grpc}" in out and f"http://127.0.0.1:{server.metrics}/metrics" in out
    assert "curl -s" in out


@needs_server
def test_http_json_grpc_and_tritonclient_http_give_the_pytorch_tokens(server, reference):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    for prompt, n in [("Once upon a time", 12), ("The cat", 5), ("Lily and Ben went to the park to play with a ball", 9)]:
        want = reference(prompt, n)
        status, reply = server.generate({"text_input": prompt, "max_tokens": n})
        assert status == 200 and ids_of(reply) == want, reply
        assert reply["text_output"].strip() == reference.tokenizer.decode(want, skip_special_tokens=True).strip()
        ids = reference.tokenizer(prompt).input_ids
        status, reply = server.generate({"input_ids": ids, "max_tokens": n})
        assert status == 200 and ids_of(reply) == want

        text = np.array([[prompt.encode()]], dtype=np.object_)
        limit = np.array([[n]], np.int64)
        h = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}")
        inputs = [httpclient.InferInput("text_input", [1, 1], "BYTES"), httpclient.InferInput("max_tokens", [1, 1], "INT64")]
        inputs[0].set_data_from_numpy(text)
        inputs[1].set_data_from_numpy(limit)
        assert h.infer("stories", inputs).as_numpy("output_ids")[0].tolist() == want
        h.close()

        g = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
        inputs = [grpcclient.InferInput("input_ids", [1, len(ids)], "INT64"), grpcclient.InferInput("max_tokens", [1, 1], "INT64")]
        inputs[0].set_data_from_numpy(np.array([ids], np.int64))
        inputs[1].set_data_from_numpy(limit)
        assert g.infer("stories", inputs).as_numpy("output_ids")[0].tolist() == want
        g.close()


@needs_server
def test_streaming_sends_one_event_per_token(server, reference):
    import tritonclient.grpc as grpcclient

    prompt, n = "Once upon a time", 10
    want = reference(prompt, n)
    status, body = server.post("/v2/models/stories_stream/generate_stream", {"text_input": prompt, "max_tokens": n})
    events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
    assert status == 200 and [ids_of(e) for e in events] == [[t] for t in want]
    status, reply = server.generate({"text_input": prompt, "max_tokens": n}, model="stories_stream")
    assert status == 200 and "error" in reply  # several responses: generate needs "stream": false
    status, reply = server.generate({"text_input": prompt, "max_tokens": n, "stream": False}, model="stories_stream")
    assert status == 200 and ids_of(reply) == want
    assert "".join(e["text_output"] for e in events) == reply["text_output"]

    results: queue.Queue = queue.Queue()
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    g.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        inputs = [grpcclient.InferInput("text_input", [1, 1], "BYTES"), grpcclient.InferInput("max_tokens", [1, 1], "INT64")]
        inputs[0].set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
        inputs[1].set_data_from_numpy(np.array([[n]], np.int64))
        g.async_stream_infer("stories_stream", inputs, request_id="s1")
        got = []
        for _ in range(len(want)):
            result, error = results.get(timeout=30)
            assert error is None, error
            got.append(result.as_numpy("output_ids").reshape(-1).tolist())
        assert got == [[t] for t in want]
    finally:
        g.stop_stream()
        g.close()


@needs_server
def test_concurrent_clients_get_their_own_answers_and_share_batches(server):
    import tritonclient.http as httpclient

    def request(t, k):
        return PROMPTS[(t + k) % len(PROMPTS)], 4 + (t * 3 + k * 5) % 17

    alone = {}
    for t in range(16):
        for k in range(4):
            key = request(t, k)
            if key not in alone:
                status, reply = server.generate({"text_input": key[0], "max_tokens": key[1]})
                assert status == 200
                alone[key] = ids_of(reply)
    answers, errors = {}, []

    def client(t):
        try:
            c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}", network_timeout=120)
            for k in range(4):
                prompt, n = request(t, k)
                inputs = [httpclient.InferInput("text_input", [1, 1], "BYTES"),
                          httpclient.InferInput("max_tokens", [1, 1], "INT64")]
                inputs[0].set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
                inputs[1].set_data_from_numpy(np.array([[n]], np.int64))
                answers[(t, k)] = c.infer("stories", inputs).as_numpy("output_ids")[0].tolist()
            c.close()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"client {t}: {exc!r}")

    threads = [threading.Thread(target=client, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(answers) == 64
    assert all(answers[(t, k)] == alone[request(t, k)] for t in range(16) for k in range(4))
    sizes = [int(n) for n in re.findall(r"stories: execute batch of (\d+) requests", server.log.read_text())]
    assert max(sizes) > 1, sizes
    with urllib.request.urlopen(server.url + "/v2/models/stories/stats", timeout=10) as r:
        stats = json.loads(r.read())["model_stats"][0]["batch_stats"]
    assert max(s["batch_size"] for s in stats) > 1


@needs_server
@pytest.mark.parametrize("body, status, message", [
    ({"max_tokens": 4}, 400, "neither text_input"),
    ({}, 400, "request has 0 inputs"),
    ({"text_input": ""}, 400, "text_input is empty"),
    ({"input_ids": []}, 400, "input_ids is empty"),
    ({"text_input": "Once", "max_tokens": 0}, 400, "max_tokens must be at least 1 (got 0)"),
    ({"text_input": "Once", "max_tokens": -5}, 400, "max_tokens must be at least 1 (got -5)"),
    ({"text_input": "Once", "max_tokens": 512}, 400, "over this model's limit of 511"),
    ({"input_ids": [1, 403, 600, 70000]}, 400, "outside the vocabulary [0, 512): 600, 70000"),
    ({"input_ids": [1] * 500, "max_tokens": 20}, 400, "500 tokens + max_tokens 20 = 520 pass the model's 512 positions"),
    ({"text_input": "Once", "input_ids": [1]}, 400, "not both"),
    (b"this is not json", 500, "failed to parse the request JSON"),
    ({"input_ids": "abc"}, 500, "Unable to parse"),
])
def test_bad_requests_are_refused_and_the_server_stays_ready(server, body, status, message):
    raw = isinstance(body, bytes)
    got, text = server.post("/v2/models/stories/generate", body, raw=raw)
    assert got == status and message in json.loads(text)["error"], text
    assert server.ready()
    code, reply = server.generate({"text_input": "Once upon a time", "max_tokens": 3})
    assert code == 200 and len(ids_of(reply)) == 3


@needs_server
def test_wrong_dtype_is_refused_by_name(server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    h = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}")
    bad = httpclient.InferInput("input_ids", [1, 2], "INT32")
    bad.set_data_from_numpy(np.array([[1, 403]], np.int32))
    with pytest.raises(InferenceServerException, match="input_ids.*INT32.*expects 'INT64'"):
        h.infer("stories", [bad])
    h.close()
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    bad = grpcclient.InferInput("max_tokens", [1, 1], "FP32")
    bad.set_data_from_numpy(np.array([[3.0]], np.float32))
    with pytest.raises(InferenceServerException, match="max_tokens.*FP32.*expects 'INT64'"):
        g.infer("stories", [bad])
    g.close()
    assert server.ready()


@needs_server
def test_clients_cannot_load_models(server):
    status, text = server.post("/v2/repository/models/stories_step/load", {})
    assert status >= 400 and "not allowed" in text, (status, text)


def test_serve_without_the_wheel_says_how_to_install(monkeypatch, repo):
    import ulsexport.serve.server as server_module

    monkeypatch.setattr(server_module.importlib.util, "find_spec", lambda name: None)
    result = cli("serve", repo)
    assert result.exit_code == 2 and "pip install --no-deps nvidia-pytriton==0.7.0" in result.output


def test_the_models_python_is_probed_and_refused_with_reasons(tmp_path):
    from ulsexport.errors import UserError
    from ulsexport.serve.server import ModelPython, server_env

    here, probed = ModelPython.of(), ModelPython.of(sys.executable)  # this Python, asked as another one
    assert probed == ModelPython(Path(sys.executable).absolute(), here.version, here.libdir)
    if not SERVER_MISSING:
        env = server_env(probed)
        assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).absolute().parent)
    with pytest.raises(UserError, match="could not run it"):
        ModelPython.of(tmp_path / "no-such-python")
    for numpy, missing, message in [("2.1.0", [], "numpy 2.1.0: the Python backend stub"),
                                    ("1.26.4", ["ulsexport"], "cannot import ulsexport")]:
        fake = tmp_path / f"python-{numpy}-{len(missing)}"
        answer = json.dumps({"version": "3.12", "libdir": "/usr/lib", "missing": missing, "numpy": numpy})
        fake.write_text(f"#!/bin/sh\necho '{answer}'\n")
        fake.chmod(0o755)
        with pytest.raises(UserError, match=message):
            ModelPython.of(fake)


def test_serve_refuses_what_is_not_a_repository(artifact):
    if SERVER_MISSING:
        pytest.skip(SERVER_MISSING)
    result = cli("serve", artifact["onnx"])
    assert result.exit_code == 2 and "not a Triton repository" in result.output


@needs_server
def test_zz_sigterm_stops_the_server_cleanly(server):
    """Last (zz): stops the module's server and checks that nothing is left behind."""
    pid = int(re.search(r"tritonserver pid (\d+)", server.stdout.read_text()).group(1))
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 143  # SIGTERM's exit code, once the server is stopped
    assert "stopped (exit code 0)" in server.stdout.read_text()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not list(Path("/dev/shm").glob(f"ulsexport_{server.process.pid}_*"))
