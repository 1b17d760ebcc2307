"""ulsexport's own CUDA kernels for onnxruntime: a custom-op library, built here with nvcc, and the graph
rewrite that uses it.

`DecodeMatMul` (domain com.ulsexport, `decode_matmul.cu`) is a MatMul by an fp16 weight held transposed
([F, K]); with swiglu=1 a gated MLP's gate and up stacked ([2F, K]), the SiLU and product included. A
decode step's one or two rows run a GEMV that streams each weight row once (cuBLAS's kernels for such
shapes cost each product its weight bytes plus 4-6 us, measured on the H200); more rows (a prompt, a
larger batch) go to cuBLAS.

`use_decode_matmul` rewrites a graph in memory: each MatMul by a 2-D fp16 initializer becomes
DecodeMatMul over `Transpose(weight)`, and each gated MLP one DecodeMatMul over the Concat of its two
transposed weights. onnxruntime folds those into initializers when the session is made (constant
folding, on the host), so the export's files and their layout stay as they are and no second copy is
kept.

The library is built on first use for the GPU's architecture into a cache folder, keyed by the source
and the architecture, and found there after (then nothing but nvidia-smi is needed);
`ULSEXPORT_KERNELS_LIBRARY` names a library built elsewhere. Building needs nvcc (CUDA 12 or newer),
cuBLAS's headers and library, and onnxruntime's C/C++ headers, 1.21 or newer (onnxruntime's release
archives' include/ folder, or Debian's and Ubuntu's libonnxruntime-dev: ORT_INCLUDE_DIR names the folder
holding onnxruntime_cxx_api.h); the library then loads in any onnxruntime of that API version or newer.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ...errors import UserError

SOURCE = Path(__file__).with_name("decode_matmul.cu")
LIBRARY_NAME = "libulsexport_kernels.so"
LIBRARY_ENV = "ULSEXPORT_KERNELS_LIBRARY"
DOMAIN = "com.ulsexport"
DECODE_MATMUL = "DecodeMatMul"
TRANSPOSED = ".ulsexport_nk"     # suffix of a weight's transposed copy
STACKED = ".ulsexport_gate_up"   # suffix of a gated MLP's stacked gate and up
FLOAT16 = 10  # onnx.TensorProto.FLOAT16


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ulsexport" / "kernels"


def _first_with(candidates, name: str) -> Path | None:
    return next((Path(c) for c in candidates if c and (Path(c) / name).exists()), None)


def _nvidia_package_dirs(sub: str) -> list[Path]:
    """`sub` folders of the nvidia-* pip packages (cuBLAS's headers and library ship there)."""
    try:
        import nvidia
    except ImportError:
        return []
    return [Path(p) / part / sub for p in nvidia.__path__ for part in ("cu13", "cu12", "cublas")]


def gpu_arch() -> str:
    """The compute capability of the GPU CUDA numbers 0 (the first of CUDA_VISIBLE_DEVICES, which nvidia-smi
    does not read), as nvcc's architecture number ("90" for an H100 or H200)."""
    first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
    try:
        done = subprocess.run(["nvidia-smi", "-i", first or "0", "--query-gpu=compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        done = None
    if done is None or done.returncode != 0 or not done.stdout.strip():
        raise UserError("building ulsexport's CUDA kernels needs the GPU's compute capability: nvidia-smi did not "
                        "give it (no GPU or no driver here)")
    return done.stdout.split()[0].replace(".", "")


def build_command(output: Path, arch: str | None = None) -> list[str]:
    """The nvcc command that builds the library into `output` for `arch` (default: this machine's GPU), or a
    UserError saying what is missing."""
    nvcc = shutil.which("nvcc") or _first_with([os.environ.get("CUDA_HOME", "") + "/bin", "/usr/local/cuda/bin"],
                                                "nvcc")
    if nvcc is None:
        raise UserError("building ulsexport's CUDA kernels needs nvcc (the CUDA toolkit) on PATH or in CUDA_HOME")
    nvcc = Path(nvcc) / "nvcc" if Path(nvcc).is_dir() else Path(nvcc)
    cuda_home = Path(os.environ.get("CUDA_HOME") or Path(nvcc).resolve().parent.parent)
    ort_include = _first_with([os.environ.get("ORT_INCLUDE_DIR"), "/usr/include/onnxruntime",
                               "/usr/local/include/onnxruntime"], "onnxruntime_cxx_api.h")
    if ort_include is None:
        raise UserError("building ulsexport's CUDA kernels needs onnxruntime's C/C++ headers: set ORT_INCLUDE_DIR "
                        "to the folder holding onnxruntime_cxx_api.h (onnxruntime's release archive's include/, or "
                        "/usr/include/onnxruntime from the libonnxruntime-dev package)")
    cublas_include = _first_with([cuda_home / "include", *_nvidia_package_dirs("include")], "cublas_v2.h")
    cublas_lib = next((d for d in [cuda_home / "lib64", cuda_home / "lib", *_nvidia_package_dirs("lib")]
                       if d.is_dir() and any(d.glob("libcublas.so*"))), None)
    if cublas_include is None or cublas_lib is None:
        raise UserError("building ulsexport's CUDA kernels needs cuBLAS's headers and library (CUDA_HOME, or the "
                        "nvidia-cublas pip package)")
    cublas = sorted(cublas_lib.glob("libcublas.so*"), key=lambda p: len(p.name))[0].name
    arch = arch or gpu_arch()
    gencode = f"-gencode=arch=compute_{arch},code=[sm_{arch},compute_{arch}]"  # and PTX, for newer GPUs
    return [str(nvcc), "-O3", "-std=c++17", gencode, "-shared", "-Xcompiler", "-fPIC", "-cudart", "shared",
            f"-I{ort_include}", f"-I{cublas_include}", f"-L{cublas_lib}", f"-l:{cublas}",
            "-Xlinker", f"-rpath={cublas_lib}", "-o", str(output), str(SOURCE)]


def library(arch: str | None = None) -> Path:
    """The custom-op library: `ULSEXPORT_KERNELS_LIBRARY`, or this source's build for `arch` (default: this
    machine's GPU) in the cache, built now if missing (written whole or not at all)."""
    if os.environ.get(LIBRARY_ENV):
        path = Path(os.environ[LIBRARY_ENV]).resolve()  # dlopen would search the system's folders for a bare name
        if not path.is_file():
            raise UserError(f"{LIBRARY_ENV}={os.environ[LIBRARY_ENV]}: no such file")
        return path
    arch = arch or gpu_arch()
    key = hashlib.sha256(SOURCE.read_bytes() + arch.encode()).hexdigest()[:16]
    path = cache_folder() / f"{key}-sm{arch}" / LIBRARY_NAME
    if path.is_file():
        return path
    command = build_command(path, arch)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            partial = Path(tmp) / LIBRARY_NAME
            done = subprocess.run(build_command(partial, arch), capture_output=True, text=True)
            if done.returncode != 0:
                log = path.parent / "build.log"
                log.write_text(" ".join(command) + "\n\n" + done.stdout + done.stderr)
                lines = (done.stderr or done.stdout).splitlines()
                error = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "no output")
                raise UserError(f"nvcc could not build {SOURCE.name}: {error.strip()} (the whole log: {log})")
            partial.replace(path)
    except OSError as exc:
        raise UserError(f"could not build ulsexport's CUDA kernels into {path.parent}: {exc}") from None
    return path


def use_decode_matmul(model) -> int:
    """Rewrite `model` (an onnx ModelProto, external weights not loaded) in place: each gated MLP's
    gate and up MatMuls with their SiLU and product (`_swiglu_patterns`) become one gated DecodeMatMul
    over Concat(Transpose(gate), Transpose(up)), and each other MatMul by a 2-D fp16 initializer a
    DecodeMatMul over Transpose(weight). The Transposes and Concats (of initializers only) go first in
    the graph, one per weight or pair however many nodes read it, under names no value has. How many
    MatMuls were replaced."""
    from onnx import helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)  # held, so that each node's id() stays its own while this runs
    taken = {n for node in nodes for n in (*node.input, *node.output, node.name)} | set(weights) | {
        v.name for v in (*graph.input, *graph.output)}
    made: dict[tuple, str] = {}     # (op, weights) -> the value made of them
    first: list = []                # the nodes that make them
    replace: dict[int, list] = {}   # id of a node -> the nodes in its place (none: removed)

    def unique(name: str) -> str:
        out, n = name, 1
        while out in taken:
            out, n = f"{name}.{n}", n + 1
        taken.add(out)
        return out

    def transposed(weight: str) -> str:
        if ("t", weight) not in made:
            out = made["t", weight] = unique(weight + TRANSPOSED)
            first.append(helper.make_node("Transpose", [weight], [out], name=out, perm=[1, 0]))
        return made["t", weight]

    def stacked(gate: str, up: str) -> str:
        if ("gu", gate, up) not in made:
            parts = [transposed(gate), transposed(up)]
            out = made["gu", gate, up] = unique(gate + STACKED)
            first.append(helper.make_node("Concat", parts, [out], name=out, axis=0))  # gate rows, then up rows
        return made["gu", gate, up]

    replaced = 0
    for gate, up, sigmoid, act, product in _swiglu_patterns(nodes, [o.name for o in graph.output], weights):
        weight = stacked(gate.input[1], up.input[1])
        replace[id(product)] = [helper.make_node(DECODE_MATMUL, [gate.input[0], weight], [product.output[0]],
                                                 name=product.name or unique(weight), domain=DOMAIN, swiglu=1)]
        for node in (gate, up, sigmoid, act):
            replace[id(node)] = []
        replaced += 2
    for node in nodes:
        if id(node) not in replace and _is_weight_matmul(node, weights):
            node.input[1] = transposed(node.input[1])
            node.op_type, node.domain = DECODE_MATMUL, DOMAIN
            replaced += 1
    if replaced:
        rewritten = first + [new for node in nodes for new in replace.get(id(node), [node])]
        del graph.node[:]
        graph.node.extend(rewritten)
        if DOMAIN not in {o.domain for o in model.opset_import}:
            model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return replaced


def _is_weight_matmul(node, weights: dict) -> bool:
    """A MatMul by a 2-D fp16 initializer."""
    weight = weights.get(node.input[1]) if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") else None
    return weight is not None and weight.data_type == FLOAT16 and len(weight.dims) == 2


def _swiglu_patterns(nodes: list, graph_outputs: list[str], weights: dict):
    """(gate, up, sigmoid, act, product) nodes of each gated MLP written as MatMuls by fp16 weights of one
    shape over one input, silu(g) = g * Sigmoid(g), and the product silu(gate) * up (genai's builder and
    torch's exporter both write it so), whose intermediate values nothing else reads."""
    producer = {out: node for node in nodes for out in node.output}
    readers: dict[str, int] = {}
    for name in [name for node in nodes for name in node.input] + graph_outputs:
        readers[name] = readers.get(name, 0) + 1

    def made_by(name: str, op: str):
        node = producer.get(name)
        return node if node is not None and node.op_type == op and node.domain in ("", "ai.onnx") else None

    for product in nodes:
        if product.op_type != "Mul" or product.domain not in ("", "ai.onnx"):
            continue
        for act_out, up_out in (product.input, reversed(product.input)):
            act, up = made_by(act_out, "Mul"), made_by(up_out, "MatMul")
            if act is None or up is None or not _is_weight_matmul(up, weights):
                continue
            for gate_out, sigmoid_out in (act.input, reversed(act.input)):
                gate, sigmoid = made_by(gate_out, "MatMul"), made_by(sigmoid_out, "Sigmoid")
                if (gate is not None and sigmoid is not None and sigmoid.input[0] == gate_out
                        and _is_weight_matmul(gate, weights) and gate.input[0] == up.input[0]
                        and list(weights[gate.input[1]].dims) == list(weights[up.input[1]].dims)
                        and readers[gate_out] == 2 and readers[sigmoid_out] == 1
                        and readers[act_out] == 1 and readers[up_out] == 1):
                    yield gate, up, sigmoid, act, product
                    break
            else:
                continue
            break
