"""Issue 33's guarantees for `ulsexport triton` and `ulsexport serve`: a manifest is input (its paths stay
inside its folder), nothing is written into a repository or an export, the artifact is checked before
it is packaged, settings are bounded, bad input is one line and exit 2, and the server never outlives
`serve` (SIGKILL included), nor leaves shared memory or temporary folders.

The server tests run the real tritonserver of the nvidia-pytriton wheel and skip where it cannot run;
every server a test starts is stopped (try/finally: SIGTERM, then SIGKILL of its process group).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from conftest import STORIES  # noqa: E402
from test_serve import CLI, SERVER_MISSING, cli  # noqa: E402
from ulsexport.testing import free_ports  # noqa: E402

from ulsexport.errors import UserError  # noqa: E402

needs_server = pytest.mark.skipif(SERVER_MISSING is not None, reason=SERVER_MISSING or "")


def one_line_error(result, message):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


# -- artifacts ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """stories260K pruned at 2x, exported to ONNX (concat cache), and a Triton repository over it."""
    from ulsexport.export.trace import export_onnx
    from ulsexport.prune import plan_for_model, prune_checkpoint

    root = tmp_path_factory.mktemp("serve-rel")
    hf = prune_checkpoint(STORIES, root / "hf", plan_for_model(STORIES, 2), quiet=True).out_dir
    onnx = Path(export_onnx(hf, root / "onnx", optimize=False, quiet=True).out_dir)
    result = cli("triton", "--model", onnx, "--out", root / "triton", "--name", "stories", "--max-tokens", "100")
    assert result.exit_code == 0, result.output
    return {"root": root, "onnx": onnx, "repo": root / "triton"}


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    from ulsexport.export.multi_depth import export_multi_depth

    root = tmp_path_factory.mktemp("multi-rel")
    return export_multi_depth(STORIES, root / "multi", [1, 2], quiet=True).out_dir


def copy_of(folder: Path, dest: Path, edit=None) -> Path:
    shutil.copytree(folder, dest)
    if edit is not None:
        manifest = json.loads((dest / "ulsexport.json").read_text())
        edit(manifest)
        (dest / "ulsexport.json").write_text(json.dumps(manifest))
    return dest


# -- 1: every path a manifest names stays inside its folder -------------------------------------
def test_artifact_path_keeps_manifest_paths_inside_the_folder(tmp_path):
    from ulsexport.artifact import artifact_path

    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "sub" / "f").write_text("x")
    (tmp_path / "a" / "link").symlink_to(tmp_path / "outside")
    assert artifact_path(tmp_path / "a", "sub/f") == (tmp_path / "a" / "sub" / "f").resolve()
    for bad, why in [("../x", "lies outside"), ("sub/../../x", "lies outside"), ("/etc/passwd", "absolute path"),
                     ("link", "lies outside"), ("", "relative to its folder"), (None, "relative to its folder"),
                     (3, "relative to its folder"), (["f"], "relative to its folder"), (".", "lies outside"),
                     ("a\0b", "relative to its folder")]:
        with pytest.raises(UserError, match=why):
            artifact_path(tmp_path / "a", bad)


@pytest.mark.parametrize("field, value", [
    ("external_data", "../../../../escaped.txt"),
    ("external_data", "ESCAPED"),
    ("file", "SECRET"),
    ("file", "../secret.txt"),
])
def test_triton_refuses_manifest_paths_out_of_the_artifact(artifact, tmp_path, field, value):
    secret, escaped = tmp_path / "secret.txt", tmp_path / "escaped.txt"
    secret.write_text("secret")
    escaped.write_text("keep me")
    value = value.replace("SECRET", str(secret)).replace("ESCAPED", str(escaped))
    work = tmp_path / "deep" / "er" / "still"
    work.mkdir(parents=True)
    folder = copy_of(artifact["onnx"], work / "onnx", lambda m: m["onnx"].update({field: value}))
    result = cli("triton", "--model", folder, "--out", work / "out")
    one_line_error(result, "lies outside" if not value.startswith("/") else "absolute path")
    assert not (work / "out").exists() and escaped.read_text() == "keep me" and escaped.stat().st_nlink == 1
    assert secret.read_text() == "secret"


def test_triton_does_not_follow_a_symlink_out_of_the_artifact(artifact, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    folder = copy_of(artifact["onnx"], tmp_path / "onnx")
    (folder / "notes.txt").symlink_to(secret)
    result = cli("triton", "--model", folder, "--out", tmp_path / "out")
    one_line_error(result, "lies outside")
    assert not (tmp_path / "out").exists()


def test_engine_step_model_refuses_an_engine_file_out_of_its_folder(tmp_path):
    from ulsexport.engine.triton import write_step_model

    (tmp_path / "engine").mkdir()
    (tmp_path / "plan").write_bytes(b"PLAN")
    for file in ("../plan", str(tmp_path / "plan")):
        with pytest.raises(UserError, match="engine.file"):
            write_step_model(tmp_path / "engine", tmp_path / "repo", "x", {"engine": {"file": file}, "onnx": {}})
    assert not (tmp_path / "repo").exists()


# -- 9: `triton` checks what it packages ---------------------------------------------------------
def _truncate(path: Path, keep: float):
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


MULTI_BREAKS = {
    "weights truncated": (lambda d, m: _truncate(d / "weights.onnx.data", 0.5), "its manifest says"),
    "weights empty": (lambda d, m: _truncate(d / "weights.onnx.data", 0), "is empty"),
    "weights missing": (lambda d, m: (d / "weights.onnx.data").unlink(), "is missing"),
    "depth graph missing": (lambda d, m: (d / "2x.onnx").unlink(), "2x.onnx is missing"),
    "depth graph truncated": (lambda d, m: _truncate(d / "2x.onnx", 0.4), "2x.onnx is not a complete ONNX graph"),
    "graph named but absent": (lambda d, m: m["graphs"][1].update(file="nothing.onnx"), "nothing.onnx is missing"),
    "graph path outside": (lambda d, m: m["graphs"][1].update(file="../full.onnx"), "lies outside"),
    "graph without onnx section": (lambda d, m: m["graphs"][1].pop("onnx"), "has no onnx"),
    "graphs not a list": (lambda d, m: m.update(graphs="full.onnx"), "`graphs` must be a list"),
    "tokenizer.model deleted": (lambda d, m: (d / "tokenizer.model").unlink(), "tokenizer"),
}


@pytest.mark.parametrize("name", list(MULTI_BREAKS))
def test_triton_refuses_a_broken_multi_depth_export(multi, tmp_path, name):
    breaker, message = MULTI_BREAKS[name]
    folder = copy_of(multi, tmp_path / "multi")
    manifest = json.loads((folder / "ulsexport.json").read_text())
    breaker(folder, manifest)
    (folder / "ulsexport.json").write_text(json.dumps(manifest))
    result = cli("triton", "--model", folder, "--out", tmp_path / "repo")
    one_line_error(result, message)
    assert not (tmp_path / "repo").exists()


def test_triton_packages_a_sound_multi_depth_export(multi, tmp_path):
    result = cli("triton", "--model", multi, "--out", tmp_path / "repo")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", ["graph truncated", "external data short"])
def test_triton_refuses_a_broken_single_depth_export(artifact, tmp_path, name):
    import onnx

    folder = copy_of(artifact["onnx"], tmp_path / "onnx")
    if name == "graph truncated":
        _truncate(folder / "model.onnx", 0.3)
        message = "not a complete ONNX graph"
    else:  # the graph's weights moved out to a data file, which is then cut short
        proto = onnx.load(str(folder / "model.onnx"))
        onnx.save(proto, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                  size_threshold=0)
        _truncate(folder / "model.onnx.data", 0.5)
        message = "short of the"
    result = cli("triton", "--model", folder, "--out", tmp_path / "repo")
    one_line_error(result, message)


# -- 11, 12, 20: settings bounded, a full disk, paths the server cannot load from ---------------
@pytest.mark.parametrize("args, message", [
    (["--max-batch", "3000000000"], "--max-batch must be at most 4096"),
    (["--queue-delay-us", str(2 ** 70)], "--queue-delay-us must be at most 60000000"),
    (["--instances", "1000000"], "--instances must be at most 64"),
    (["--default-max-tokens", "0"], "--default-max-tokens must be at least 1"),
])
def test_triton_bounds_its_settings(artifact, tmp_path, args, message):
    result = cli("triton", "--model", artifact["onnx"], "--out", tmp_path / "repo", *args)
    one_line_error(result, message)


def test_triton_bounds_recipe_values_too(artifact, tmp_path):
    from ulsexport.serve.repository import write_repository

    for values, message in [({"queue_delay_us": 2 ** 70}, "at most"), ({"instances": True}, "whole number"),
                            ({"max_batch": 2.5}, "whole number")]:
        with pytest.raises(UserError, match=message):
            write_repository(artifact["onnx"], tmp_path / "repo", **values)


def test_triton_on_a_full_disk_is_one_line(artifact, tmp_path, monkeypatch):
    import ulsexport.serve.repository as repository

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(repository, "_link_or_copy", full)
    result = cli("triton", "--model", artifact["onnx"], "--out", tmp_path / "repo")
    one_line_error(result, "No space left on device")
    assert not (tmp_path / "repo").exists() and not [p for p in tmp_path.iterdir() if "tmp" in p.name]


@pytest.mark.parametrize("out", ["with space/repo", "caf\u00e9/repo"])
def test_triton_refuses_a_path_the_server_cannot_load_from(artifact, tmp_path, out):
    result = cli("triton", "--model", artifact["onnx"], "--out", tmp_path / out)
    one_line_error(result, "holds a space or a non-ASCII character")


@needs_server
def test_serve_refuses_a_repository_path_the_server_cannot_load_from(artifact, tmp_path):
    repo = tmp_path / "with space" / "repo"
    shutil.copytree(artifact["repo"], repo)
    one_line_error(cli("serve", repo), "holds a space or a non-ASCII character")


# -- 7: max_tokens is read as a 64-bit number, never wrapped ------------------------------------
def test_max_tokens_is_int64_and_refused_above_the_limit(artifact):
    import numpy as np

    from ulsexport.serve.generate_model import Generator, RequestError

    config = (artifact["repo"] / "models" / "stories" / "config.pbtxt").read_text()
    assert '{ name: "max_tokens" data_type: TYPE_INT64' in config
    generator = Generator(artifact["onnx"], max_tokens=20)
    for value in (2 ** 32 + 1, 2 ** 31, 2 ** 33 + 3, 2 ** 63 - 1):
        with pytest.raises(RequestError, match=f"max_tokens {value} is over this model's limit of 20"):
            generator.prompt("Once", max_tokens=np.array([[value]], np.int64))
    for bad in (np.array([[3.0]]), np.array([["3"]], dtype=object)):
        with pytest.raises(RequestError, match="max_tokens must be one whole number"):
            generator.prompt("Once", max_tokens=bad)


# -- 13, 14, 2: what `serve` refuses before it starts anything ----------------------------------
@needs_server
@pytest.mark.parametrize("manifest, message", [
    ("not json {", "is not valid JSON"),
    ('{"kind": "triton-repository"}', "has no valid `models` list"),
    ('{"kind": "triton-repository", "models": "stories"}', "has no valid `models` list"),
    ('{"kind": "triton-repository", "models": [{"name": "../x", "served": true}]}', "has no valid `models` list"),
    ('{"kind": "triton-repository", "models": [{"name": "x", "served": true}], "served_repository": "/etc"}',
     "absolute path"),
    ('{"kind": "triton-repository", "models": [{"name": "x", "served": true}], "served_repository": "../.."}',
     "lies outside"),
    ("[1, 2]", "not a JSON object"),
])
def test_serve_refuses_a_broken_repository_manifest(artifact, tmp_path, manifest, message):
    repo = tmp_path / "repo"
    (repo / "models" / "x").mkdir(parents=True)
    (repo / "models" / "x" / "config.pbtxt").write_text("")
    (repo / "ulsexport.json").write_text(manifest)
    one_line_error(cli("serve", repo), message)


@needs_server
def test_serve_refuses_log_files_that_would_change_a_repository_or_an_export(artifact, tmp_path):
    repo, onnx = artifact["repo"], artifact["onnx"]
    artifact_file = repo / "models" / "stories" / "1" / "artifact" / "model.onnx"
    before = {p: p.read_bytes() for p in (repo / "ulsexport.json", artifact_file, onnx / "model.onnx")}
    linked = tmp_path / "linked.log"
    os.link(onnx / "config.json", linked)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        for log, message in [(repo / "ulsexport.json", "lies inside the repository"),
                             (artifact_file, "lies inside the repository"),
                             (repo / "new.log", "lies inside the repository"),
                             (onnx / "model.onnx", "lies inside the artifact"),
                             (linked, "hard-linked to another file"),
                             (tmp_path, "is a directory"),
                             (tmp_path / "missing" / "x.log", "does not exist")] + (
                [(read_only / "x.log", "is not writable")] if os.geteuid() != 0 else []):
            one_line_error(cli("serve", repo, "--log-file", log), message)
    finally:
        read_only.chmod(0o755)
    assert {p: p.read_bytes() for p in before} == before and not (repo / "new.log").exists()


# -- 6: a warning before every interface is bound ------------------------------------------------
@needs_server
@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("::", True), ("127.0.0.1", False),
                                          ("localhost", False)])
def test_serve_warns_when_the_endpoints_face_the_network(artifact, monkeypatch, host, warned):
    from ulsexport.serve.server import TritonServer

    def refuse(self):
        raise UserError("not started in this test")

    monkeypatch.setattr(TritonServer, "start", refuse)
    result = cli("serve", artifact["repo"], "--host", host)
    assert result.exit_code == 2
    warning = "reachable from the network, unauthenticated"
    assert (warning in result.stderr) == warned, result.stderr


# -- 8: busy ports, and a ready server that is not ours -----------------------------------------
def _fake_repository(root: Path) -> Path:
    (root / "m").mkdir(parents=True)  # no manifest: the folder's own models
    (root / "m" / "config.pbtxt").write_text("")
    return root


class _AlwaysReady(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_serve_refuses_busy_ports(tmp_path):
    from ulsexport.serve.server import TritonServer

    http, grpc, metrics = free_ports(3)
    busy = socket.socket()
    busy.bind(("127.0.0.1", grpc))
    busy.listen()
    try:
        server = TritonServer(_fake_repository(tmp_path / "repo"), http_port=http, grpc_port=grpc,
                              metrics_port=metrics)
        with pytest.raises(UserError, match=f"--grpc-port {grpc} on 127.0.0.1 is not free"):
            server.start()
        assert server.process is None
    finally:
        busy.close()
    with pytest.raises(UserError, match="ports must differ"):
        TritonServer(tmp_path / "repo", http_port=http, grpc_port=http, metrics_port=metrics)


def test_a_port_out_of_range_is_refused_before_anything_starts(tmp_path):
    """`serve --http-port 99999` used to report ready with a URL no client can use."""
    from ulsexport.serve.server import TritonServer

    repo = _fake_repository(tmp_path / "repo")
    for flag, port in (("http_port", 99999), ("grpc_port", 0), ("metrics_port", 65536)):
        with pytest.raises(UserError, match=f"--{flag.replace('_', '-')} must be a port number from 1 to 65535"):
            TritonServer(repo, **{flag: port})


@needs_server
def test_a_log_file_the_disk_refuses_is_one_line(tmp_path, monkeypatch):
    """14: a read-only file system (EROFS, which root meets too) when the log is opened."""
    import ulsexport.serve.server as server_module
    from ulsexport.serve.server import TritonServer

    def read_only(path, mode="r", *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    http, grpc, metrics = free_ports(3)
    server = TritonServer(_fake_repository(tmp_path / "repo"), http_port=http, grpc_port=grpc, metrics_port=metrics,
                          log_file=tmp_path / "x.log")
    monkeypatch.setattr(server_module, "open", read_only, raising=False)
    with pytest.raises(UserError, match="opening --log-file .*x.log failed: Read-only file system"):
        server.start()
    assert server.process is None and not _own_temp(os.getpid())


def test_a_ready_server_on_our_port_is_ours(tmp_path):
    """Another process answering ready on our HTTP port is not our server."""
    from ulsexport.serve.server import TritonServer, listening_ports

    http, grpc, metrics = free_ports(3)
    other = HTTPServer(("127.0.0.1", http), _AlwaysReady)
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        server = TritonServer(_fake_repository(tmp_path / "repo"), http_port=http, grpc_port=grpc,
                              metrics_port=metrics)
        server.process = sleeper  # our "server" listens on nothing
        assert server._ok("/v2/health/ready") and not server.ready()
        assert http in listening_ports(os.getpid())
    finally:
        sleeper.kill()
        sleeper.wait()
        other.shutdown()
        other.server_close()


# -- 18: the first error line of the log ---------------------------------------------------------
def test_first_error_finds_the_cause_not_the_options_table():
    from ulsexport.serve.server import first_error, load_failure

    log = ('I1207 03:00:00.1 1 server.cc:674] \n+------------------+\n| Option | Value |\n+------+\n'
           'E1207 03:00:00.1 1 server.cc:241] "CudaDriverHelper has not been initialized."\n'
           'I1207 03:00:00.2 1 python_be.cc:2] "TRITONBACKEND_ModelInstanceInitialize: stories_0 (CPU device 0)"\n'
           'Traceback (most recent call last):\n  File "model.py", line 3\n'
           "ModuleNotFoundError: No module named 'ulsexport'\n"
           "E1207 03:00:01.3 1 model_lifecycle.cc:654] \"failed to load 'stories' version 1: Internal: "
           "ModuleNotFoundError: No module named 'ulsexport'\"\n"
           'E1207 03:00:01.4 1 model_repository_manager.cc:1] "Invalid argument: ensemble"\n'
           'I1207 03:00:02 1 server.cc:2] "Waiting for in-flight requests to complete."\n')
    assert first_error(log) == ("failed to load 'stories' version 1: Internal: ModuleNotFoundError: "
                                "No module named 'ulsexport'")
    stub = ("I1207 02:57:37.860237 7459 pb_stub.cc:2105]  Failed to preinitialize Python stub: Python model file "
            "not found in '/r/models/s/1/model.py'\n")
    assert load_failure(stub) == first_error(stub) == ("Failed to preinitialize Python stub: Python model file not "
                                                       "found in '/r/models/s/1/model.py'")
    assert load_failure(log.replace("failed to load", "loaded")) is None
    assert first_error("Traceback:\nValueError: cannot reshape array\nmore") == "ValueError: cannot reshape array"
    assert first_error("I1207 all fine\n") is None


# -- the real server -----------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (the Python backend's stubs of a tritonserver)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == parent:
                    found.append(int(stat.parent.name))
                    frontier.append(int(stat.parent.name))
    return found


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(OSError):  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True


def _own_temp(serve_pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"ulsexport-triton-{serve_pid}-*"))


class Serve:
    """`ulsexport serve` in a subprocess, on free ports; `stop_all` kills whatever is left (server, stubs)."""

    def __init__(self, repo: Path, root: Path, *args, cwd: Path | None = None):
        self.http, grpc, metrics = free_ports(3)
        self.out = root / f"serve-{self.http}.out"
        with open(self.out, "wb") as out:  # -P: the decoy cwd must not shadow the package in `serve` itself
            self.process = subprocess.Popen([sys.executable, "-P", "-c", CLI, "serve", str(repo), "--http-port",
                                             str(self.http), "--grpc-port", str(grpc), "--metrics-port",
                                             str(metrics), *map(str, args)],
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
        self.url = f"http://127.0.0.1:{self.http}"
        self.server_pid = None
        self.stubs: list[int] = []

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_ready(self, timeout=240):
        deadline = time.monotonic() + timeout
        while "Ctrl-C stops the server" not in self.text():
            if self.process.poll() is not None:
                pytest.fail(f"ulsexport serve exited:\n{self.text()}")
            assert time.monotonic() < deadline, f"not ready:\n{self.text()}"
            time.sleep(0.2)
        self.server_pid = int(re.search(r"tritonserver pid (\d+)", self.text()).group(1))
        self.stubs = _children(self.server_pid)
        return self

    def post(self, path, body, timeout=60):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def stop_all(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for pid in [self.server_pid, *self.stubs]:
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def serving(repo, root, *args, cwd=None, ready=True):
    served = Serve(repo, root, *args, cwd=cwd)
    try:
        yield served.wait_ready() if ready else served
    finally:
        served.stop_all()


def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@needs_server
def test_served_from_a_folder_holding_ulsexport_then_stopped_by_repeated_signals(artifact, tmp_path):
    """19: a decoy `ulsexport/` in the working directory does not reach the stubs; 7, 24, 25 over that server;
    23 and 5: SIGTERM, SIGTERM, SIGINT within 0.6 s exit 143 after the cleanup, leaving nothing behind."""
    decoy = tmp_path / "cwd"
    (decoy / "ulsexport").mkdir(parents=True)
    (decoy / "ulsexport" / "__init__.py").write_text("raise ImportError('the decoy ulsexport was imported')\n")
    with serving(artifact["repo"], tmp_path, cwd=decoy) as served:
        for n in (2 ** 32 + 1, 2 ** 31, 2 ** 33 + 3):  # 7: never wrapped to a small number
            status, text = served.post("/v2/models/stories/generate", {"text_input": "Once", "max_tokens": n})
            assert status == 400 and f"max_tokens {n} is over this model's limit of 100" in text, text
        status, text = served.post("/v2/models/stories/generate", {"text_input": "Once", "max_tokens": 2 ** 64 + 1})
        assert status >= 400 and "error" in json.loads(text), text
        status, text = served.post("/v2/models/stories/generate", {"text_input": "Once", "max_tokens": 3})
        assert status == 200 and len(json.loads(text)["output_ids"]) == 3, text
        # 24: generate on the streaming model is refused by Triton with a clear reason (it cannot tell the model
        # which endpoint was called), or answered once with "stream": false
        status, text = served.post("/v2/models/stories_stream/generate", {"text_input": "Once", "max_tokens": 3})
        assert "use generate stream" in json.loads(text)["error"], text
        status, text = served.post("/v2/models/stories_stream/generate", {"text_input": "Once", "max_tokens": 3,
                                                                          "stream": False})
        assert status == 200 and len(json.loads(text)["output_ids"]) == 3, text
        # 25: a stream whose client goes away stops decoding its row (the prompt decodes 90 tokens otherwise)
        prompt = next(p for p in ("Once upon a time", "The cat", "Tom", "A bird", "One day")
                      if len(json.loads(served.post("/v2/models/stories/generate",
                                                    {"text_input": p, "max_tokens": 90})[1])["output_ids"]) == 90)
        request = urllib.request.Request(served.url + "/v2/models/stories_stream/generate_stream",
                                         data=json.dumps({"text_input": prompt, "max_tokens": 90}).encode())
        log = Path(re.search(r"log:\s+(\S+) \(tritonserver pid", served.text()).group(1))

        def steps():
            return [int(s) for s in re.findall(r"stories_stream: execute batch of \d+ requests.*?, (\d+) decode steps",
                                               log.read_text(errors="replace"))]
        before = len(steps())
        response = urllib.request.urlopen(request, timeout=60)
        assert response.readline().startswith(b"data: ")
        response.close()  # disconnect after the first token
        assert _wait_until(lambda: len(steps()) > before, 60)
        assert steps()[-1] < 60, steps()
        time.sleep(2)  # tritonserver 2.5x may crash or hang when stopped while it drops a closed stream

        shm = f"ulsexport_{served.process.pid}_"
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
            served.process.send_signal(sig)
            time.sleep(0.2)
        assert served.process.wait(timeout=90) == 143, served.text()
        assert all(_gone(pid) for pid in [served.server_pid, *served.stubs]), "server or stubs left running"
        assert not list(Path("/dev/shm").glob(f"{shm}*")) and not _own_temp(served.process.pid)
        assert "stopped (exit code 0)" in served.text()


@needs_server
def test_sigint_exits_130_and_leaves_no_temp_folder(artifact, tmp_path):
    with serving(artifact["repo"], tmp_path) as served:
        served.process.send_signal(signal.SIGINT)
        assert served.process.wait(timeout=90) == 130, served.text()
        assert _gone(served.server_pid) and not _own_temp(served.process.pid)


@needs_server
def test_kill_9_of_serve_takes_the_server_and_its_stubs_down(artifact, tmp_path):
    from ulsexport.serve.server import remove_stale_temp

    with serving(artifact["repo"], tmp_path) as served:
        assert served.stubs, "no stub processes found"
        shm = f"ulsexport_{served.process.pid}_"
        served.process.kill()
        served.process.wait()
        assert _wait_until(lambda: all(_gone(p) for p in [served.server_pid, *served.stubs]), 60), \
            "tritonserver or its stubs outlived serve"
        assert _wait_until(lambda: not list(Path("/dev/shm").glob(f"{shm}*")), 10)
        assert _own_temp(served.process.pid)  # its folder stays (the log), until the next serve
        remove_stale_temp()
        assert not _own_temp(served.process.pid)


@needs_server
def test_a_model_that_cannot_load_fails_at_once_with_its_first_error(artifact, tmp_path):
    """20, 18: a missing model.py is noticed without waiting out the ready timeout, and the one line
    names the cause."""
    repo = tmp_path / "repo"
    shutil.copytree(artifact["repo"], repo)
    (repo / "models" / "stories_stream" / "1" / "model.py").unlink()
    start = time.monotonic()
    served = Serve(repo, tmp_path, "--ready-timeout", "200")
    try:
        assert served.process.wait(timeout=150) == 2
    finally:
        served.stop_all()
    lines = [line for line in served.text().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "model.py" in lines[0], served.text()
    assert time.monotonic() - start < 120
    log = Path(re.search(r"\(log: (\S+)\)$", lines[0]).group(1))  # kept for the user, and named
    assert log.is_file() and "Failed to preinitialize" in log.read_text()
    if log.parent.name.startswith("ulsexport-triton-"):
        shutil.rmtree(log.parent)
    assert not list(Path("/dev/shm").glob(f"ulsexport_{served.process.pid}_*"))
