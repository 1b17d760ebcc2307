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
import re
import socket
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
import contextlib
from dataclasses import dataclass
from pathlib import Path

from ..artifact import MANIFEST_NAME, Artifact, artifact_path
from ..errors import UserError
from ..outputs import check_writable_file, io_error, resolve_path
from ..processes import die_with_parent

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
    manifest = Artifact.open(repository).record  # not JSON, or not an object: one line
    if manifest is not None:
        if manifest.get("kind") != "triton-repository":
            raise UserError(f"{repository} is a {manifest.get('kind')} artifact, not a Triton repository; "
                            f"write one with `ulsexport triton --model {repository} --out REPO`")
        models = manifest.get("models")
        if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("name"), str)
                                                   and re.fullmatch(MODEL_NAME, m["name"]) for m in models):
            raise UserError(f"{repository / MANIFEST_NAME} has no valid `models` list (each a model with a plain "
                            "name); write the repository again with `ulsexport triton`")
        folder = artifact_path(repository, manifest.get("served_repository", "models"), "served_repository")
        names = [m["name"] for m in models if m.get("served")]
    else:
        folder = repository
        names = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file()) \
            if repository.is_dir() else []
    if not folder.is_dir() or not names:
        raise UserError(f"{repository} holds no Triton models; write a repository with `ulsexport triton`")
    return folder, names


MODEL_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
TMP_PREFIX = "ulsexport-triton-"
def remove_stale_temp() -> None:
    """Remove the temporary folders (log, working directory) of `serve` runs that were killed outright."""
    for path in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
        match = re.match(rf"{TMP_PREFIX}(\d+)-", path.name)
        if match and path.is_dir() and not path.is_symlink() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def check_port_free(host: str, port: int, flag: str) -> None:
    """Refuse a port another process listens on (a second `serve` would otherwise talk to the first)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tritonserver binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"{flag} {port} on {host} is not free ({exc.strerror}): another server (another "
                            f"`ulsexport serve`?) uses it; stop it or choose other ports") from None


def listening_ports(pid: int) -> set[int]:
    """The TCP ports that process `pid` listens on (Linux /proc)."""
    inodes = set()
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(fd.path)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


LOG_LINE = re.compile(r"^([IWE])\d{4} [^\]]*\] ?(.*)$")
BENIGN = ("CudaDriverHelper has not been initialized",)  # logged as an error by every CPU-only start
# lines that mean a model will not load (the stub of a model that failed to start is waited for minutes)
LOAD_FAILED = re.compile(r"Failed to preinitialize|failed to load|^terminate called|"
                         r"Stub process .* (unhealthy|not healthy)")


def _messages(log: str):
    for line in log.splitlines():
        match = LOG_LINE.match(line)
        level, message = (match.group(1), match.group(2)) if match else (None, line)
        yield level, message.strip().strip('"').strip()


def load_failure(log: str) -> str | None:
    """The first log line saying that a model cannot load, else None."""
    return next((m for _, m in _messages(log) if LOAD_FAILED.search(m)), None)


def first_error(log: str) -> str | None:
    """The cause of a failure in tritonserver's log: its first error line (E-lines, the benign ones
    skipped), else a line saying a model cannot load, else a Python exception line of a stub."""
    errors = [m for level, m in _messages(log) if level == "E" and m and not m.startswith(BENIGN)]
    return next(iter(errors), None) or load_failure(log) or next(
        (m for _, m in _messages(log) if re.match(r"^[A-Za-z_.]*(Error|Exception): ", m)), None)


class TritonServer:
    """One tritonserver process over a repository (from `ulsexport triton`, or any folder of models)."""

    def __init__(self, repository: str | Path, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, log_file: str | Path | None = None,
                 exit_timeout_s: int = 30, log_verbose: int = 0, extra_args: tuple[str, ...] = (),
                 python: str | Path | None = None):
        from .repository import plain_path

        self.repository = plain_path(Path(repository), "the repository").resolve()
        self.model_repository, self.models = served_models(self.repository)
        self.python = ModelPython.of(python)
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.ports = {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port}
        for flag, port in self.ports.items():
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise UserError(f"{flag} must be a port number from 1 to 65535 (got {port})")
        if len(set(self.ports.values())) < 3:
            raise UserError(f"the HTTP, gRPC and metrics ports must differ (got {http_port}, {grpc_port}, "
                            f"{metrics_port})")
        self.log_path = self.check_log_file(log_file) if log_file else None
        self.exit_timeout_s, self.log_verbose, self.extra_args = exit_timeout_s, log_verbose, tuple(extra_args)
        self.shm_prefix = f"ulsexport_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self.process: subprocess.Popen | None = None
        self._log_handle = None
        self._own_dir: Path | None = None   # working directory of the server (and its log unless given)

    def check_log_file(self, log_file) -> Path:
        """--log-file, refused where writing it would change a file ulsexport or the user needs: inside the
        repository or any ulsexport artifact (their files are hard links to the exported artifact's), a file
        with other hard links; or where it cannot be written (a directory, a read-only folder)."""
        check_writable_file(log_file, "--log-file")
        path = resolve_path(log_file)
        folder = self.repository if self.repository in path.parents else next(
            (f for f in path.parents if (f / MANIFEST_NAME).is_file()), None)
        if folder is not None:
            what = "the repository" if folder == self.repository else "the artifact"
            raise UserError(f"--log-file {log_file} lies inside {what} {folder}; ulsexport never writes into one (a "
                            "repository's files are hard links to the exported artifact's): choose a log file outside it")
        if path.exists() and (not path.is_file() or path.stat().st_nlink > 1):
            what = "not a plain file" if not path.is_file() else "hard-linked to another file"
            raise UserError(f"--log-file {log_file} is {what}; writing the log would change it: choose a new file")
        return path

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
        for flag, port in self.ports.items():
            check_port_free(self.host, port, flag)
        command = self.command()
        remove_stale_temp()
        # a folder of our own: the server's working directory (a folder holding `ulsexport/` would shadow the
        # package in the stubs) and its log unless --log-file names one; the pid in its name lets a later run
        # remove it if this one is killed outright
        self._own_dir = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-"))
        if self.log_path is None:
            self.log_path = self._own_dir / "tritonserver.log"
        try:
            self._log_handle = open(self.log_path, "wb")
        except OSError as exc:
            self.stop()
            raise io_error(exc, f"opening --log-file {self.log_path}") from None
        # a session of its own (a terminal's Ctrl-C reaches us only, and we forward it once), stopped when we die
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log_handle,
                                        stderr=subprocess.STDOUT, env=server_env(self.python), cwd=self._own_dir,
                                        start_new_session=True, preexec_fn=die_with_parent(os.getpid()))
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except FileNotFoundError:
            return ""

    def _ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def ready(self) -> bool:
        return (self._ok("/v2/health/ready") and all(self._ok(f"/v2/models/{m}/ready") for m in self.models)
                and self.http_port in listening_ports(self.process.pid))  # ours, not another server's

    def failure(self, what: str) -> UserError:
        """One line: what happened and the first error in the server's log (the log is kept, and named)."""
        cause = first_error(self.log_text()) or "no error line in its log"
        return UserError(f"{what}: {' '.join(cause.split())} (log: {self.log_path})")

    def wait_ready(self, timeout_s: float = 180) -> TritonServer:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = self.failure(f"tritonserver exited (code {self.process.returncode}) before its models "
                                     "were ready")
                self.stop(keep_log=True)
                raise error
            if self.ready():
                return self
            if load_failure(self.log_text()):  # at once, not after the whole timeout
                error = self.failure("tritonserver could not load the models")
                self.stop(keep_log=True)
                raise error
            time.sleep(0.2)
        error = self.failure(f"tritonserver was not ready after {timeout_s:.0f} s")
        self.stop(keep_log=True)
        raise error

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout_s: float | None = None, sig: int = signal.SIGTERM, keep_log: bool = False) -> int | None:
        """Signal the server, wait for it (models unloaded, stubs gone), then kill what is left; remove our
        shared memory and temporary folder (`keep_log`: a temporary log stays, for the user to read);
        returns its exit code. Safe to call twice."""
        process, code = self.process, None
        if process is not None:
            wait = timeout_s if timeout_s is not None else self.exit_timeout_s + 10
            if process.poll() is None:
                process.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=wait)
            # stubs outlive a server that died or hangs; they are in its session's process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        self.remove_shared_memory()
        if self._own_dir is not None:
            if keep_log and self.log_path and self.log_path.parent == self._own_dir:
                for path in self._own_dir.iterdir():
                    if path != self.log_path:
                        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            else:
                shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None
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
