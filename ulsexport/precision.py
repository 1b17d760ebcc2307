"""Dtypes, devices and the one table of parity tolerances, shared by export, runtimes and the validator."""
from __future__ import annotations

from .errors import UserError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Relative logit error allowed against PyTorch fp32, from each dtype's rounding (int4: tokens only).
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 2e-2, "int4": 1.0}
DEVICES = ("cpu", "cuda")


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def tolerance_for(dtype: str) -> float:
    if dtype not in TOLERANCES:
        raise UserError(f"unknown dtype '{dtype}'; choose one of {', '.join(TOLERANCES)}")
    return TOLERANCES[dtype]


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES and not device.startswith("cuda:"):
        raise UserError(f"unknown device '{device}'; choose cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device here")
    return device


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the error scaled by the logits' own range."""
    import numpy as np

    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / max(np.abs(expected).max(), 1e-12))
