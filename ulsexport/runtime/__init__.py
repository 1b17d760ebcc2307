"""Runtimes that decode greedily with a KV cache behind one interface (`base.Runtime`: prefill, step,
greedy), in one registry that the CLI, recipes, the validator and the server read.

- `torch`: a Hugging Face checkpoint in PyTorch (`pytorch`);
- `ort`: an ONNX export in onnxruntime, CPU or CUDA (`ort`);
- `genai`: an ONNX artifact with a genai_config.json in onnxruntime-genai's own loop (`genai`);
- `tensorrt`: an engine of `ulsexport engine` (`tensorrt`).

Adding a runtime is one module with a class offering `open(folder, dtype, device)` and one line in
RUNTIMES.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from ..artifact import artifact_kind
from ..errors import UserError, first_line
from .base import GreedyRun, Runtime


@dataclass(frozen=True)
class RuntimeEntry:
    name: str
    module: str                 # imported on first use: onnxruntime-genai, for one, is optional
    cls: str
    kinds: tuple[str, ...]      # artifact kinds it runs
    summary: str

    def open(self, folder, dtype: str | None = None, device: str = "cpu", **options) -> Runtime:
        return getattr(importlib.import_module(self.module, __name__), self.cls).open(folder, dtype, device, **options)


RUNTIMES: dict[str, RuntimeEntry] = {r.name: r for r in [
    RuntimeEntry("torch", ".pytorch", "TorchRuntime", ("hf-checkpoint",), "checkpoints in PyTorch"),
    RuntimeEntry("ort", ".ort", "OrtRuntime", ("onnx", "genai"), "ONNX exports of either builder in onnxruntime"),
    # an "onnx" export of the torch builder runs too: it carries a genai_config.json
    RuntimeEntry("genai", ".genai", "GenaiRuntime", ("genai", "onnx"), "onnxruntime-genai (either ONNX builder)"),
    RuntimeEntry("tensorrt", ".tensorrt", "TensorrtRuntime", ("tensorrt",), "TensorRT engines of `ulsexport engine` (CUDA)"),
]}


def default_runtime(kind: str) -> str:
    """The runtime an artifact kind runs in when none is named."""
    first = [name for name, entry in RUNTIMES.items() if entry.kinds[0] == kind]
    return (first or [name for name, entry in RUNTIMES.items() if kind in entry.kinds])[0]


# the libraries whose exceptions mean "this artifact cannot be read" (onnx also covers onnxruntime_genai)
LIBRARY_MODULES = ("onnxruntime", "onnx", "google.protobuf", "tensorrt")


def open_runtime(folder: str | Path, runtime: str, dtype: str | None = None, device: str = "cpu",
                 **options) -> Runtime:
    """The runtime named `runtime` over artifact `folder`, refusing artifacts it cannot run; `options` are
    the runtime's own (`cuda_graph=False` for ort, say)."""
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime '{runtime}'; choose one of {', '.join(RUNTIMES)}")
    entry, kind = RUNTIMES[runtime], artifact_kind(Path(folder))
    if kind not in entry.kinds:
        raise UserError(f"--runtime {runtime} runs {' or '.join(entry.kinds)} artifacts; {folder} is a {kind} artifact")
    try:
        return entry.open(folder, dtype, device, **options)
    except UserError:
        raise
    except Exception as exc:  # a corrupt or truncated artifact, refused by the library that reads it
        if not (type(exc).__module__ or "").startswith(LIBRARY_MODULES):
            raise
        raise UserError(f"{folder}: {runtime} could not load it ({type(exc).__name__}: {first_line(exc)[:200]}); "
                        "is the export complete? rebuild it with `ulsexport onnx`") from None


__all__ = ["RUNTIMES", "GreedyRun", "Runtime", "RuntimeEntry", "default_runtime", "open_runtime"]
