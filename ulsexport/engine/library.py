"""The one adapter over the two TensorRT Python libraries, whose APIs match for every call made here
(Builder, OnnxParser, optimization profiles, BuilderConfig, Runtime, IExecutionContext):

- `tensorrt`: full TensorRT (data-center GPUs too: Hopper, H100/H200). Its PyPI packages are stubs that
  download from NVIDIA's index at install time;
- `tensorrt-rtx`: TensorRT for RTX, module `tensorrt_rtx_bindings` (wheels tensorrt-rtx-cu13-bindings
  and tensorrt-rtx-cu13-libs). Strongly typed networks only (its BuilderFlag has no FP16 or BF16),
  timing cache calls are no-ops since 1.2 (its own note), and its engines run on compute capability
  8.0, 8.6, 8.9, 12.0 and 12.1 only: not on 9.0 (H100/H200), where loading one is refused.

The differences are data in `Library`; `load_library` imports one, or says in one line what to install.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import UserError, first_line


@dataclass(frozen=True)
class Library:
    name: str                       # --library value
    module: str                     # Python module
    title: str                      # for messages
    install: str                    # what to run where it is missing
    timing_cache: bool              # whether its timing cache does anything
    runs_on: tuple[str, ...] | None  # compute capabilities its engines run on; None: every one the release supports
    runs_on_note: str

    def weak_precision_flags(self, trt) -> tuple[str, ...]:
        """The BuilderFlag names of weakly typed precisions this build of the library offers."""
        return tuple(f for f in ("FP16", "BF16") if hasattr(trt.BuilderFlag, f))

    def version(self, trt) -> str:
        return str(getattr(trt, "__version__", "unknown"))


LIBRARIES: dict[str, Library] = {lib.name: lib for lib in [
    Library("tensorrt", "tensorrt", "TensorRT",
            "pip install tensorrt --extra-index-url https://pypi.nvidia.com (NVIDIA's index; PyPI's tensorrt-cu1x-libs "
            "are stubs that fetch from it)",
            timing_cache=True, runs_on=None,
            runs_on_note="every GPU the TensorRT release supports (Turing to Blackwell, data-center GPUs included); "
                         "an engine runs on the compute capability it was built on"),
    Library("tensorrt-rtx", "tensorrt_rtx_bindings", "TensorRT for RTX",
            "pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs",
            timing_cache=False, runs_on=("8.0", "8.6", "8.9", "12.0", "12.1"),
            runs_on_note="compute capability 8.0 8.6 8.9 12.0 12.1 (A100, RTX 30xx/A-series, L4/L40/RTX 40xx, "
                         "RTX 50xx/Blackwell RTX, GB10); not 9.0 (H100/H200): its runtime refuses to load there"),
]}
DEFAULT_ORDER = ("tensorrt", "tensorrt-rtx")  # without --library: the first that imports


def install_hint() -> str:
    return ("no TensorRT library is installed: " + " or ".join(
        f"{LIBRARIES[n].install.split(' (')[0]}" for n in ("tensorrt-rtx", "tensorrt")))


def load_library(name: str | None = None, module=None):
    """(Library, its imported module). `module` is used as the module instead of importing one (the
    tests pass a fake); `name` None: the first of DEFAULT_ORDER that imports."""
    if name is not None and name not in LIBRARIES:
        raise UserError(f"unknown --library '{name}'; choose one of {', '.join(LIBRARIES)}")
    if module is not None:
        return LIBRARIES[name or "tensorrt-rtx"], module
    failures = []
    for candidate in ([name] if name else DEFAULT_ORDER):
        lib = LIBRARIES[candidate]
        try:
            trt = importlib.import_module(lib.module)
            trt.Builder  # a stub package imports but has no API
        except Exception as exc:  # missing, a stub, or libraries that fail to load
            failures.append((lib, exc))
            continue
        return lib, trt
    if name:
        lib, exc = failures[0]
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == lib.module
        raise UserError(f"{lib.title} is not installed: {lib.install}" if missing else
                        f"{lib.title} ({lib.module}) does not import: {first_line(exc)}; reinstall with: {lib.install}")
    raise UserError(install_hint())
