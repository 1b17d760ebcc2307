"""Which onnxruntime form of a Llama MLP decodes fastest on CUDA: gate and up apart, packed, or a one-expert MoE?

A decode step's MLP is down(silu(x @ gate) * (x @ up)). onnxruntime-gpu 1.31 has no dense SwiGLU op
(`../swiglu-op/`), but its com.microsoft `MoE` takes `activation_type="swiglu"` over a packed gate/up
weight and runs both GEMMs and the activation itself. With one expert (every row routed to it, weight 1)
and the clamp, alpha and beta of its SwiGLU set to Llama's (no clamp, alpha 1, beta 0) that is the dense
MLP (gate and up columns interleaved, `swiglu_fusion=1`, the one layout its CPU kernel takes). This builds one graph per form, each with --layers MLPs of the 7B shape (own random fp16 weights,
so that no layer is served from L2; every MLP reads the same input, their outputs summed once), captures
it as a CUDA graph, and reports per MLP: CUPTI kernel time and kernel count of a replay, wall time of a
replay, and the output's relative error against an fp32 numpy reference (fp16 tolerance 1e-2).

    python benchmarks/experiments/mlp-fusion/mlp_fusion_probe.py --json OUT/mlp-fusion.json
    python benchmarks/experiments/mlp-fusion/mlp_fusion_probe.py --device cpu --hidden 64 --inter 96 --json /tmp/m.json
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def mlp_nodes(form: str, layer: int, helper, hidden: int, inter: int) -> tuple[list, list[str]]:
    """(nodes, weight names) of one MLP reading `x` and writing `y{layer}`."""
    w = lambda part: f"{part}{layer}"  # noqa: E731
    if form == "moe":
        node = helper.make_node(
            "MoE", ["x", "router", w("gate_up"), "", w("down")], [f"y{layer}"], domain="com.microsoft",
            k=1, activation_type="swiglu", swiglu_fusion=1, swiglu_limit=float("inf"), activation_alpha=1.0,
            activation_beta=0.0, normalize_routing_weights=0, name=f"moe{layer}")
        return [node], [w("gate_up"), w("down")]
    if form == "packed":
        first = [helper.make_node("MatMul", ["x", w("gate_up")], [w("gu")]),
                 helper.make_node("Split", [w("gu"), "halves"], [w("g"), w("u")], axis=-1)]
        weights = [w("gate_up")]
    else:
        first = [helper.make_node("MatMul", ["x", w("gate")], [w("g")]),
                 helper.make_node("MatMul", ["x", w("up")], [w("u")])]
        weights = [w("gate"), w("up")]
    rest = [helper.make_node("Sigmoid", [w("g")], [w("s")]), helper.make_node("Mul", [w("g"), w("s")], [w("a")]),
            helper.make_node("Mul", [w("a"), w("u")], [w("h")]),
            helper.make_node("MatMul", [w("h"), w("down")], [f"y{layer}"])]
    return first + rest, weights + [w("down")]


def weights_for(form: str, name: str, gate, up, down, moe_layout: str):
    """The array of weight `name` (gate, up: [hidden, inter]; down: [inter, hidden]) in `form`'s layout."""
    if name.startswith("gate_up"):
        # [hidden, 2 inter]: MatMul's gate then up; the MoE's interleaved (gate, up) column pairs
        array = np.stack([gate, up], axis=2).reshape(len(gate), -1) if form == "moe" else np.concatenate(
            [gate, up], axis=1)
    elif name.startswith("down"):
        array = down
    else:
        return gate if name.startswith("gate") else up
    if form != "moe":
        return array
    # the MoE's experts axis first; "nk" stores each expert's weight transposed ([out, in])
    return np.ascontiguousarray(array.T[None]) if moe_layout == "nk" else array[None]


WEIGHTS: dict = {}


def build(form: str, args, rng_seed: int, moe_layout: str = "nk"):
    from onnx import TensorProto, helper, numpy_helper

    dtype = np.float16 if args.device == "cuda" else np.float32
    if (rng_seed, dtype) not in WEIGHTS:  # the same weights for every form
        rng = np.random.default_rng(rng_seed)
        WEIGHTS[rng_seed, dtype] = [tuple((rng.standard_normal(shape, np.float32) * 0.02).astype(dtype) for shape in (
            (args.hidden, args.inter), (args.hidden, args.inter), (args.inter, args.hidden))) for _ in range(args.layers)]
    nodes, inits, weights = [], [], WEIGHTS[rng_seed, dtype]
    for layer, (gate, up, down) in enumerate(weights):
        layer_nodes, names = mlp_nodes(form, layer, helper, args.hidden, args.inter)
        nodes += layer_nodes
        inits += [numpy_helper.from_array(weights_for(form, n, gate, up, down, moe_layout), n) for n in names]
    if form == "packed":
        inits.append(numpy_helper.from_array(np.array([args.inter, args.inter], np.int64), "halves"))
    nodes.append(helper.make_node("Sum", [f"y{i}" for i in range(args.layers)], ["y"]))
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", elem, ["rows", args.hidden])]
    if form == "moe":
        inputs.append(helper.make_tensor_value_info("router", elem, ["rows", 1]))
    graph = helper.make_graph(nodes, form, inputs, [helper.make_tensor_value_info("y", elem, ["rows", args.hidden])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10  # onnxruntime 1.31 refuses the newer IR versions of onnx 1.23
    return model.SerializeToString(), weights


def reference(x: np.ndarray, weights) -> np.ndarray:
    out = 0
    for gate, up, down in weights:
        g, u = x.astype(np.float32) @ gate.astype(np.float32), x.astype(np.float32) @ up.astype(np.float32)
        out = out + ((g / (1 + np.exp(-g))) * u) @ down.astype(np.float32)
    return out


def time_form(session, args, rows: int, dtype) -> dict:
    import onnxruntime as ort

    from ulsexport.testing import kernel_totals

    device = args.device
    x = np.random.default_rng(rows).standard_normal((rows, args.hidden)).astype(dtype)
    feeds = {"x": x}
    if "router" in {i.name for i in session.get_inputs()}:
        feeds["router"] = np.ones((rows, 1), dtype)
    binding = session.io_binding()
    values = {k: ort.OrtValue.ortvalue_from_numpy(v, device, 0) for k, v in feeds.items()}
    for k, v in values.items():
        binding.bind_ortvalue_input(k, v)
    out = np.zeros((rows, args.hidden), dtype)  # kept alive: on the CPU the value wraps this memory
    y = ort.OrtValue.ortvalue_from_numpy(out, device, 0)
    binding.bind_ortvalue_output("y", y)
    options = ort.RunOptions()
    if device == "cuda":
        options.add_run_config_entry("gpu_graph_id", str(rows))
    for _ in range(3):  # warm-up runs and the capture
        session.run_with_iobinding(binding, options)
    walls = []
    for _ in range(args.replays):
        start = time.perf_counter()
        session.run_with_iobinding(binding, options)
        walls.append(time.perf_counter() - start)
    totals = kernel_totals(lambda: [session.run_with_iobinding(binding, options) for _ in range(5)])
    kernel_us = sum(us for us, _ in totals.values()) / 5
    launches = sum(n for _, n in totals.values()) / 5
    top = sorted(totals.items(), key=lambda kv: -kv[1][0])[:6]
    return {"rows": rows, "wall_us_per_mlp": 1e6 * statistics.median(walls) / args.layers,
            "kernel_us_per_mlp": kernel_us / args.layers, "kernels_per_mlp": launches / args.layers,
            "top_kernels": [(k[:80], round(us / n, 2), n / 5) for k, (us, n) in top],
            "y": y.numpy().copy(), "x": x}  # a copy: on the CPU numpy() is a view of `out`


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inter", type=int, default=11008)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    import onnxruntime as ort

    from ulsexport.precision import TOLERANCES, relative_error
    from ulsexport.testing import write_results

    dtype = np.float16 if args.device == "cuda" else np.float32
    providers = ([("CUDAExecutionProvider", {"enable_cuda_graph": "1"})] if args.device == "cuda"
                 else ["CPUExecutionProvider"])
    results = {"onnxruntime": ort.__version__, "settings": {k: str(v) for k, v in vars(args).items()}, "forms": {}}
    for form in ("separate", "packed", "moe"):
        entry = results["forms"][form] = {}
        session = None
        for layout in (("nk", "kn") if form == "moe" else ("-",)):
            model, weights = build(form, args, rng_seed=0, moe_layout=layout)
            try:
                options = ort.SessionOptions()
                options.log_severity_level = 3
                session = ort.InferenceSession(model, options, providers=providers)
                entry["moe_layout"] = layout
                break
            except Exception as exc:  # refused: recorded, the next layout tried
                entry[f"refused_{layout}"] = str(exc).splitlines()[0][:300]
        if session is None:
            print(form, entry, flush=True)
            continue
        for rows in args.rows:
            try:
                timed = time_form(session, args, rows, dtype)
            except Exception as exc:
                entry[f"rows{rows}"] = {"error": str(exc).splitlines()[0][:300]}
                continue
            expected = reference(timed.pop("x"), weights)
            got = timed.pop("y").astype(np.float32)
            timed["relative_error"] = relative_error(got, expected)
            timed["within_tolerance"] = bool(timed["relative_error"] < TOLERANCES["fp16" if dtype == np.float16 else "fp32"])
            entry[f"rows{rows}"] = timed
            print(form, rows, {k: v for k, v in timed.items() if k != "top_kernels"}, flush=True)
        del session
    lines = [f"# A Llama MLP in onnxruntime {results['onnxruntime']} on {args.device}: separate, packed, one-expert MoE",
             "", f"7B shape ({args.hidden} x {args.inter}), {args.layers} MLPs per graph, CUDA-graph replay. "
             "`python benchmarks/experiments/mlp-fusion/mlp_fusion_probe.py`.", "",
             "| form | rows | kernel us per MLP | kernels per MLP | wall us per MLP | relative error vs fp32 |",
             "|---|---|---|---|---|---|"]
    for form, entry in results["forms"].items():
        for rows in args.rows:
            r = entry.get(f"rows{rows}")
            if r is None:
                lines.append(f"| {form} | {rows} | refused: {entry} | | | |")
            elif "error" in r:
                lines.append(f"| {form} | {rows} | failed: {r['error']} | | | |")
            else:
                lines.append(f"| {form} | {rows} | {r['kernel_us_per_mlp']:.1f} | {r['kernels_per_mlp']:.1f} | "
                             f"{r['wall_us_per_mlp']:.1f} | {r['relative_error']:.2e} |")
    lines.append("")
    for form, entry in results["forms"].items():
        for rows in args.rows:
            r = entry.get(f"rows{rows}") or {}
            if "top_kernels" in r:
                lines.append(f"- {form}, {rows} rows: " + "; ".join(f"{k} {us} us x{n:g}" for k, us, n in r["top_kernels"]))
    write_results(args.json, results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
