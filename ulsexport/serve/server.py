"""Running the real Triton Inference Server from the `nvidia-pytriton` wheel over a model repository.

`TritonServer` is used by `ulsexport serve` and by the tests:

    with TritonServer("artifacts/NAME/triton", http_port=8000) as server:   # start() + wait_ready()
        print(server.http_url)
    # stop(): SIGTERM, wait, then SIGKILL; our shared-memory regions removed

What it takes care of (each seen failing otherwise):
- a backend directory of our own (never site-packages): libtriton_python.so, triton_python_backend_utils.py
  and the stub built for the running Python, copied from the wheel into a cache folder;
- the stub embeds an isolated Python (PYTHONPATH is ignored) and finds it as the first `python3` on
  PATH, so the models' interpreter's bin folder goes first on PATH (a venv's pyvenv.cfg then selects
  its site-packages, where ulsexport is): this Python, or another environment's (`python=`, e.g. one
  with numpy < 2, onnxruntime-gpu, onnx, tokenizers and ulsexport but no torch, where this Python's stack
  needs numpy 2);
- the stub links libpython3.x by name: the running interpreter's LIBDIR goes first on LD_LIBRARY_PATH
  (else `import ssl` fails in the stub with another build of the same Python), then the wheel's
  nvidia_pytriton.libs (the stub's RPATH assumes it sits in the wheel);
- loopback addresses unless told otherwise; model control off (clients cannot load or unload models);
- a shared-memory prefix of our own, so that leftovers of a crashed stub can be removed without
  touching another server's regions.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

INSTALL = "pip install --no-deps nvidia-pytriton==0.7.0 && pip install 'tritonclient[http,grpc]' && pip install -U 'protobuf>=7'"
SHM_DIR = Path("/dev/shm")


def wheel_root() -> Path:
    """site-packages/pytriton of the nvidia-pytriton wheel (found without importing pytriton, whose
    Python dependencies the server does not need)."""
    spec = importlib.util.find_spec("pytriton")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / "tritonserver" / "bin" / "tritonserver").is_file():
            return Path(location)
    raise UserError(f"no tritonserver binary: the nvidia-pytriton wheel is not installed; {INSTALL}")


def tritonserver_binary() -> Path:
    return wheel_root() / "tritonserver" / "bin" / "tritonserver"


def available() -> str | None:
    """None when the server can run here, else why not (for tests to skip with)."""
    try:
        wheel_root()
    except UserError as exc:
        return str(exc)
    if not sys.platform.startswith("linux"):
        return "tritonserver from the nvidia-pytriton wheel runs on Linux only"
    return None


def cache_dir() -> Path:
    """ULSEXPORT_CACHE, else $XDG_CACHE_HOME/ulsexport, else ~/.cache/ulsexport."""
    if os.environ.get("ULSEXPORT_CACHE"):
        return Path(os.environ["ULSEXPORT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ulsexport"


@dataclass(frozen=True)
class ModelPython:
    """The interpreter whose environment the models run in: the Python backend's stub embeds a Python
    of its version and takes its site-packages from the first `python3` on PATH."""
    executable: Path
    version: str          # "3.12"
    libdir: str | None    # where its libpython is

    @classmethod
    def of(cls, executable: str | Path | None = None) -> ModelPython:
        """This Python, or another environment's interpreter, checked for what the generate model imports."""
        if executable is None:
            found = {"version": f"{sys.version_info.major}.{sys.version_info.minor}",
                     "libdir": sysconfig.get_config_var("LIBDIR"), "missing": [], "numpy": _numpy_version()}
            executable = Path(sys.executable)
        else:
            executable = Path(executable).absolute()
            try:
                # as the stub sees it: its embedded Python ignores PYTHONPATH and PYTHONHOME
                env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
                done = subprocess.run([str(executable), "-c", _PROBE], capture_output=True, text=True, timeout=120,
                                      env=env)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise UserError(f"--python {executable}: could not run it ({type(exc).__name__}: {exc})") from None
            if done.returncode != 0:
                raise UserError(f"--python {executable}: could not run it: {done.stderr.strip()[-300:]}")
            found = json.loads(done.stdout.strip().splitlines()[-1])
        if found["missing"]:
            raise UserError(f"the models' Python ({executable}) cannot import {', '.join(found['missing'])}, "
                            f"which the generate model needs")
        if found["numpy"] and int(found["numpy"].split(".")[0]) >= 2:
            raise UserError(f"the models' Python ({executable}) has numpy {found['numpy']}: the Python backend stub "
                            f"of nvidia-pytriton 0.7.0 crashes on string and int64 tensors with numpy 2; use an "
                            f"environment with numpy<2 (ulsexport serve --python)")
        return cls(executable, found["version"], found["libdir"])


_NEEDED = ("numpy", "ulsexport")
_PROBE = ("import importlib.util, json, sys, sysconfig\n"
          f"missing = [m for m in {_NEEDED!r} if importlib.util.find_spec(m) is None]\n"
          "numpy = __import__('numpy').__version__ if 'numpy' not in missing else None\n"
          "print(json.dumps({'version': '%d.%d' % sys.version_info[:2], 'libdir': sysconfig.get_config_var('LIBDIR'),"
          " 'missing': missing, 'numpy': numpy}))")


def _numpy_version() -> str | None:
    import numpy

    return numpy.__version__


def backend_dir(python: ModelPython) -> Path:
    """A backend directory of our own holding the Python backend with the stub of the models' Python;
    returns the folder to pass as --backend-directory."""
    from importlib.metadata import version

    root = wheel_root() / "tritonserver"
    py = python.version
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        raise UserError(f"the nvidia-pytriton wheel has no Python backend stub for Python {py}")
    sources = [root / "backends" / "python" / "libtriton_python.so",
               root / "backends" / "python" / "triton_python_backend_utils.py", stub]
    target = cache_dir() / "triton-backends" / f"pytriton-{version('nvidia-pytriton')}-py{py}"
    python = target / "python"
    if all((python / s.name).is_file() and (python / s.name).stat().st_size == s.stat().st_size for s in sources):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".backends-", dir=target.parent))
    try:
        (tmp / "python").mkdir()
        for s in sources:
            shutil.copy2(s, tmp / "python" / s.name)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race with the same files
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def server_env(python: ModelPython) -> dict:
    env = dict(os.environ)
    libs = wheel_root().parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [python.libdir, str(libs), env.get("LD_LIBRARY_PATH")] if p)
    env["PATH"] = os.pathsep.join(p for p in [str(python.executable.parent), env.get("PATH")] if p)
    return env


def served_models(repository: Path) -> tuple[Path, list[str]]:
    """(the folder to pass as --model-repository, the model names to wait for)."""
    repository = Path(repository)
    manifest_path = repository / "ulsexport.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("kind") != "triton-repository":
            raise UserError(f"{repository} is a {manifest.get('kind')} artifact, not a Triton repository; "
                            f"write one with `ulsexport triton --model {repository} --out REPO`")
        folder = repository / manifest.get("served_repository", "models")
        names = [m["name"] for m in manifest["models"] if m.get("served")]
    else:
        folder = repository
        names = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file()) \
            if repository.is_dir() else []
    if not folder.is_dir() or not names:
        raise UserError(f"{repository} holds no Triton models; write a repository with `ulsexport triton`")
    return folder, names


class TritonServer:
    """One tritonserver process over a repository (from `ulsexport triton`, or any folder of models)."""

    def __init__(self, repository: str | Path, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, log_file: str | Path | None = None,
                 exit_timeout_s: int = 30, log_verbose: int = 0, extra_args: tuple[str, ...] = (),
                 python: str | Path | None = None):
        self.repository = Path(repository).resolve()
        self.python = ModelPython.of(python)
        self.model_repository, self.models = served_models(self.repository)
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.log_path = Path(log_file) if log_file else None
        self.exit_timeout_s, self.log_verbose, self.extra_args = exit_timeout_s, log_verbose, tuple(extra_args)
        self.shm_prefix = f"ulsexport_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self.process: subprocess.Popen | None = None
        self._log_handle = None
        self._own_log_dir: Path | None = None

    # -- addresses ------------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)

    @property
    def http_address(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://{self.http_address}"

    http_url = url

    @property
    def grpc_address(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    def generate_url(self, model: str | None = None, stream: bool = False) -> str:
        return f"{self.url}/v2/models/{model or self.models[0]}/generate{'_stream' if stream else ''}"

    # -- lifecycle ------------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [str(tritonserver_binary()),
                f"--model-repository={self.model_repository}",
                f"--backend-directory={backend_dir(self.python)}",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                "--allow-gpu-metrics=false" if not _has_gpu() else "--allow-gpu-metrics=true",
                "--model-control-mode=none", "--disable-auto-complete-config",
                f"--exit-timeout-secs={self.exit_timeout_s}", f"--log-verbose={self.log_verbose}",
                *self.extra_args]

    def start(self) -> TritonServer:
        if self.process is not None:
            raise RuntimeError("server already started")
        command = self.command()
        if self.log_path is None:
            self._own_log_dir = Path(tempfile.mkdtemp(prefix="ulsexport-triton-"))
            self.log_path = self._own_log_dir / "tritonserver.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(self.log_path, "wb")
        # a session of its own: a terminal's Ctrl-C reaches us only, and we forward it once
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log_handle,
                                        stderr=subprocess.STDOUT, env=server_env(self.python), start_new_session=True)
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def ready(self) -> bool:
        return self._ok("/v2/health/ready") and all(self._ok(f"/v2/models/{m}/ready") for m in self.models)

    def wait_ready(self, timeout_s: float = 180) -> TritonServer:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise UserError(f"tritonserver exited (code {code}) before its models were ready; "
                                f"last lines of {self.log_path}:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.2)
        tail = self.log_tail()
        self.stop()
        raise UserError(f"tritonserver was not ready after {timeout_s:.0f} s; last lines of its log:\n{tail}")

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout_s: float | None = None, sig: int = signal.SIGTERM) -> int | None:
        """Signal the server, wait for it (models unloaded, stubs gone), then kill what is left;
        returns its exit code. Safe to call twice."""
        process, code = self.process, None
        if process is not None:
            wait = timeout_s if timeout_s is not None else self.exit_timeout_s + 10
            if process.poll() is None:
                try:
                    process.send_signal(sig)
                    code = process.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    try:  # the server and the stubs it started share its session's process group
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    code = process.wait()
            else:
                code = process.returncode
                # stubs outlive a server killed hard; they are in its process group
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        self.remove_shared_memory()
        return code

    def remove_shared_memory(self) -> list[str]:
        """Remove the shared-memory regions of this server's stubs (our own prefix only)."""
        removed = []
        if SHM_DIR.is_dir():
            for path in SHM_DIR.glob(f"{self.shm_prefix}*"):
                try:
                    path.unlink()
                    removed.append(path.name)
                except OSError:
                    pass
        return removed

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _has_gpu() -> bool:
    return Path("/dev/nvidiactl").exists()
