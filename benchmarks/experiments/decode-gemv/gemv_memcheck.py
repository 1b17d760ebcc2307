"""The decode GEMV's memory accesses under compute-sanitizer: every shape class it takes, each tensor its own
exact-size cudaMalloc (PyTorch's caching allocator off), so that a read past a weight is reported.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \\
        python benchmarks/experiments/decode-gemv/gemv_memcheck.py

Shapes: an even and an odd feature count (the odd one leaves the last warp one row), K a multiple of the
GEMV's stride (1024) and not (its tail), one and two rows, plain and gated. Each output is checked against
float64 too (relative error under 1e-3), so the run also says the kernel computed the right thing.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from benchmarks.gemm_layout import decode_product, relative_error, swiglu_reference  # noqa: E402


def main() -> None:
    import torch

    from ulsexport.runtime.kernels import library

    path = library()
    products = {False: decode_product(path), True: decode_product(path, gated=True)}
    worst = 0.0
    for features in (1536, 1537):
        for k in (4096, 4104):
            for rows in (1, 2):
                for gated, product in products.items():
                    w = torch.randn(2 * features if gated else features, k, device="cuda", dtype=torch.float16)
                    x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
                    checks = {"reference": swiglu_reference} if gated else {}
                    error = relative_error(product, x, w, False, poison=True, **checks)
                    worst = max(worst, error)
                    print(f"features {features} K {k} rows {rows} gated {gated}: relative error {error:.2e}")
                    assert error < 1e-3
    torch.cuda.synchronize()
    print(f"all shapes within {worst:.2e} of float64")


if __name__ == "__main__":
    main()
