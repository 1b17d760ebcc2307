"""Serving artifacts with Triton Inference Server: `repository` writes a model repository
(`ulsexport triton`), `generate_model` is the Python-backend model in it, `server` runs the real
tritonserver of the nvidia-pytriton wheel over it (`ulsexport serve`)."""
from __future__ import annotations

from .repository import write_repository
from .server import TritonServer

__all__ = ["TritonServer", "write_repository"]
