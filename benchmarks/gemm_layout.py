"""Decode-shaped GEMMs in cuBLAS: does the weights' layout change how close they come to the bandwidth floor?

onnxruntime's MatMul takes its weights as [K, N] (the exported graphs store them so); a Gemm or
FusedMatMul with transB takes them as [N, K], the layout of a torch Linear. For the 7B shape's
projections at 1, 8 and 32 rows this times y = x @ W with W stored either way (torch.matmul over a
[K, N] tensor, or over the transposed view of an [N, K] one: the same cuBLAS call with the other
transpose flag), and the product with its operands swapped, y^T = W^T x^T over an [N, K] tensor (cuBLAS
then sees the rows as its M and the outputs as its N, and picks other kernels; a graph would add a
Transpose on each side, free at one row), each call on another copy of the weights so that none is
served from L2. Calls are
replayed from a CUDA graph, so launch gaps are left out; each row reports microseconds per call and
the floor (the weight bytes over the device-to-device copy bandwidth measured in the same run) over it.

    python benchmarks/gemm_layout.py --json $OUT/gemm-layout.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ulsexport.testing import copy_bandwidth, write_results

# (name, K, N) of the 7B shape's decode GEMMs: packed q/k/v, o, packed gate/up, gate (or up), down, lm head
SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 22016), ("gate", 4096, 11008),
          ("down", 11008, 4096), ("lm_head", 4096, 32000)]
L2_BYTES = 60 * 2**20  # a little above the H200's 50 MiB L2


PRODUCTS = {  # layout name -> (weights stored as [K, N]?, the product of x [rows, K] and one weight)
    "kn": (True, lambda x, w: x @ w),
    "nk": (False, lambda x, w: x @ w.t()),
    "swapped": (False, lambda x, w: w @ x.t()),
}


DECODE_ROWS = 2  # ulsexport's GEMV takes at most this many rows (more go to cuBLAS in the op)


def decode_product(library_path: Path, gated: bool = False):
    """x @ W^T over an [N, K] weight through the kernel library's GEMV entry point; `gated`: the weight is
    gate and up stacked ([2F, K]) and the product silu(x @ gate^T) * (x @ up^T), [rows, F]."""
    import ctypes

    import torch

    lib = ctypes.CDLL(str(library_path))
    lib.ulsexport_decode_gemv.restype = ctypes.c_int
    lib.ulsexport_decode_gemv.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4 + [ctypes.c_void_p]

    def product(x, w, poison: bool = False):
        features = w.shape[0] // 2 if gated else w.shape[0]
        y = torch.empty(x.shape[0], features, device="cuda", dtype=torch.float16)
        if poison:
            y.fill_(float("nan"))
        code = lib.ulsexport_decode_gemv(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.shape[0], features, w.shape[1],
                                         int(gated), torch.cuda.current_stream().cuda_stream)
        if code != 0:
            raise RuntimeError(f"ulsexport_decode_gemv returned {code}")
        return y

    return product


def swiglu_reference(x, w):
    """silu(x @ gate^T) * (x @ up^T) in float64, the [2F, K] weight's halves gate and up."""
    import torch

    gate, up = w.double().chunk(2)
    g = x.double() @ gate.t()
    return torch.nn.functional.silu(g) * (x.double() @ up.t())


def relative_error(product, x, w, kn: bool, reference=None, **options) -> float:
    """||product(x, w) - x @ W|| / ||x @ W|| (or against `reference(x, w)`), the reference in float64; NaN
    where an element is not finite."""
    import torch

    reference = reference(x, w) if reference else x.double() @ (w.double() if kn else w.double().t())
    out = product(x, w, **options)
    out = out.t() if out.shape != reference.shape else out  # the swapped product's y^T
    torch.cuda.synchronize()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out.double() - reference).norm() / reference.norm())


def time_calls(weights, x, product, replays: int = 20) -> float:
    """Microseconds per call of product(x, W) over `weights` in turn, replayed from one CUDA graph."""
    import torch

    def calls():
        for w in weights:
            product(x, w)

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        calls()  # warm-up: heuristics, workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        calls()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / (replays * len(weights))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--json", type=Path, required=True, help="results (a .md beside it)")
    parser.add_argument("--kernels", action="store_true", help="time ulsexport's DecodeMatMul kernel too")
    args = parser.parse_args()

    import torch

    products = dict(PRODUCTS)
    if args.kernels:
        from ulsexport.runtime.kernels import library

        path = library()
        products.update({"gemv": (False, decode_product(path)), "gemv-swiglu": (False, decode_product(path, True))})

    bandwidth = copy_bandwidth()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "blas": str(torch.backends.cuda.preferred_blas_library()),
               "copy_bandwidth_bytes_per_s": bandwidth, "rows": []}
    for name, k, n in SHAPES:
        nbytes = 2 * k * n
        copies = max(4, -(-2 * L2_BYTES // nbytes))
        stored = {kn: [torch.randn(*((k, n) if kn else (n, k)), device="cuda", dtype=torch.float16)
                       for _ in range(copies)] for kn in (True, False)}
        for rows in args.rows:
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            row = {"gemm": name, "k": k, "n": n, "rows": rows, "floor_us": 1e6 * nbytes / bandwidth}
            for layout, (kn, product) in products.items():
                gemv = layout.startswith("gemv")
                if gemv and (rows > DECODE_ROWS or (layout == "gemv-swiglu") != (name == "gate_up")):
                    continue
                if args.kernels:
                    checks = {"poison": True} if gemv else {}  # every element must be written
                    if layout == "gemv-swiglu":
                        checks["reference"] = swiglu_reference
                    row[f"{layout}_error"] = relative_error(product, torch.randn_like(x), stored[kn][0], kn, **checks)
                us = time_calls(stored[kn], x, product)
                row[f"{layout}_us"], row[f"{layout}_fraction"] = us, row["floor_us"] / us
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        del stored
        torch.cuda.empty_cache()
    lines = [f"# Decode GEMMs by weight layout ({results['device']}, torch {results['torch']}, "
             f"copy bandwidth {bandwidth / 1e12:.2f} TB/s)", "",
             "kn: x @ W, weights [K, N] (onnxruntime MatMul's); nk: x @ W^T, weights [N, K] (transB, a torch "
             "Linear's); swapped: W @ x^T over [N, K]. Microseconds per call from CUDA-graph replay; "
             "floor = weight bytes / copy bandwidth.", "",
             "| gemm | K x N | rows | floor us | " + " | ".join(f"{p} us (of floor)" for p in products) + " |",
             "|---|---|---|---|" + "---|" * len(products)]
    for r in results["rows"]:
        lines.append(f"| {r['gemm']} | {r['k']} x {r['n']} | {r['rows']} | {r['floor_us']:.1f} | " + " | ".join(
            f"{r[f'{p}_us']:.1f} ({r[f'{p}_fraction']:.0%})" if f"{p}_us" in r else "-" for p in products) + " |")
    if args.kernels:
        lines += ["", "Relative error against float64 (fp16 operands): " + "; ".join(
            f"{r['gemm']} x{r['rows']} "
            + ", ".join(f"{p} {r[f'{p}_error']:.1e}" for p in products if f"{p}_error" in r)
            for r in results["rows"])]
    write_results(args.json, results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
