"""ONNX export: one decoder graph for prefill and decode, with a KV cache for the kept layers only.

The exporter is `torch.onnx.export(dynamo=True)` of the Hugging Face model wrapped so that the cache
is flat tensors (`past_key_values.{i}.key/value` in, `present.{i}.key/value` out). The wrapper
rebuilds a `DynamicCache` of plain full-length layers, so sliding-window layers keep the whole
past and the sliding-window mask, not cache cropping, limits what they see; every cache input then
has the same [batch, kv_heads, past, head_dim] shape. After export the graph can be fused for
onnxruntime (onnxscript's ort_fusions); the fused graph is kept only if it still matches PyTorch.
"""
from __future__ import annotations

import time
from pathlib import Path

from .. import checkpoint as ckpt
from ..artifact import Artifact, BuildResult, graph_entry, lineage, write_manifest
from ..checkpoint import load_model_info
from ..compat import cache_argument, output_cache
from ..errors import UserError
from ..families import CPU_GQA_HEAD_MULTIPLE, LENGTH_DEPENDENT_ROPE, attends_locally
from ..models import load_causal_lm
from ..outputs import atomic_output_dir
from ..precision import TOLERANCES, relative_error, resolve_device
from ..progress import progress_bar
from ..runtime.pytorch import torch_greedy
from .genai import write_genai_config

ONNX_FILE = "model.onnx"
EXTERNAL_DATA_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB ceiling, with room for the graph
EXPORT_DTYPES = ("fp32", "fp16")
# Sample sizes for tracing: distinct, so that torch.export never unifies two dynamic axes.
SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST = 2, 3, 5
PROBE_STEPS = 3  # greedy steps of the parity probe run at export time
# The fused graphs tried, in order; "gqa-shared" is "gqa" with its cache shared (kv_cache="shared").
ATTENTION_FUSIONS = {"mha": ("mha",), "gqa": ("gqa-shared", "gqa", "mha")}
KV_CACHES = ("shared", "concat")


def cache_names(num_layers: int, prefix: str) -> list[tuple[str, str]]:
    return [(f"{prefix}.{i}.key", f"{prefix}.{i}.value") for i in range(num_layers)]


def flat_cache_module(model, uses_position_ids: bool):
    """The module torch.onnx traces: flat cache tensors [k0, v0, k1, v1, ...] in and out."""
    import torch
    from transformers import DynamicCache

    cache_name = cache_argument(model)

    class FlatCacheDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **{cache_name: cache})
            return (out.logits, *[t for layer in output_cache(out).layers for t in (layer.keys, layer.values)])

    class WithoutPositionIds(FlatCacheDecoder):  # torch.onnx keeps unused inputs: leave it out of the signature
        def forward(self, input_ids, attention_mask, past):
            return super().forward(input_ids, attention_mask, None, past)

    return FlatCacheDecoder() if uses_position_ids else WithoutPositionIds()


def export_onnx(model, out, dtype: str = "fp32", device: str = "cpu", opset: int | None = None,
                optimize: bool = True, attention: str | None = None, kv_cache: str | None = None, force: bool = False,
                quiet: bool = False, allow_pickle: bool = False) -> BuildResult:
    """Export checkpoint directory `model` to `out`/model.onnx with its manifest and tokenizer files.

    `attention` picks the fused attention tried first: "gqa" (GroupQueryAttention; falls back to
    "mha", then to no fusion, where the fused graph fails the parity check) or "mha"
    (MultiHeadAttention over key/value heads repeated to the query heads).

    `kv_cache` (gqa only; default "shared" with gqa): "shared" makes GroupQueryAttention take the
    packed projection, apply rotary itself and append to one cache buffer bound as both past and
    present, with right-padded rows (onnxruntime-genai's layout, its fastest CUDA path); models with
    sliding-window attention keep "concat". "concat": past and present are separate tensors and
    the padding mask is an attention bias (left padding, as Hugging Face pads).
    """
    start = time.perf_counter()
    model_dir, config, adapter = load_model_info(model)
    _check_dtype_device(dtype, device)
    attention = attention or "gqa"
    if attention not in ATTENTION_FUSIONS:
        raise UserError(f"unknown attention fusion '{attention}'; choose one of {', '.join(ATTENTION_FUSIONS)}")
    kv_cache = kv_cache or ("shared" if attention == "gqa" else "concat")
    if kv_cache not in KV_CACHES:
        raise UserError(f"unknown KV cache layout '{kv_cache}'; choose one of {', '.join(KV_CACHES)}")
    if kv_cache == "shared" and attention != "gqa":
        raise UserError("--kv-cache shared needs --attention gqa (GroupQueryAttention appends to the shared buffer)")
    if not adapter.onnx_exportable:
        raise UserError(f"ONNX export of '{adapter.model_type}' is not supported: {adapter.onnx_note}")
    out = Path(out)
    with atomic_output_dir(out, force, protect=(model_dir,)) as tmp, \
            progress_bar(3, "onnx export: loading the model", unit="stage", quiet=quiet) as bar:
        torch_model = load_causal_lm(model_dir, dtype, device, allow_pickle=allow_pickle)
        if adapter.onnx_experts_implementation:
            torch_model.set_experts_implementation(adapter.onnx_experts_implementation)
        bar.set_description("onnx export: tracing the graph")
        bar.update()
        program, shapes = _export_program(torch_model, adapter, opset)
        bar.set_description("onnx export: optimising and checking against PyTorch")
        bar.update()
        # onnxruntime's CPU kernel rotates only head sizes that are multiples of 16: unverifiable on CPU
        cpu_rotary = device != "cpu" or shapes["head_dim"] % CPU_GQA_HEAD_MULTIPLE == 0
        tables = rotary_tables(torch_model) if kv_cache == "shared" and cpu_rotary else None
        variants = [v for v in ATTENTION_FUSIONS[attention] if tables is not None or v != "gqa-shared"] \
            if optimize else []
        data, fusions, parity, shapes = _save_verified(program, tmp, torch_model, adapter, opset, shapes, dtype,
                                                       variants, tables)
        bar.update()
        ckpt.copy_side_files(model_dir, tmp)
        (tmp / ckpt.CONFIG_NAME).write_text((model_dir / ckpt.CONFIG_NAME).read_text())
        manifest = _manifest(model_dir, config, Artifact.open(model_dir).record, shapes, dtype, device,
                             program.model.opset_imports[""], data, fusions, parity)
        write_manifest(tmp, manifest)
        write_genai_config(tmp)
    return BuildResult(out, manifest, time.perf_counter() - start)


def rotary_tables(torch_model):
    """(cos, sin) [max positions, rotary dim / 2] float32 of the model's one rotary embedding, as
    GroupQueryAttention takes them; None where the shared-buffer graph would be wrong or cannot be
    built: sliding-window attention (the graph drops the mask that applies the window), not exactly
    one rotary module, or frequencies that change with the sequence length (one table cannot hold them)."""
    import torch

    text = torch_model.config.get_text_config()
    if attends_locally(text):
        return None
    rotary = [m for m in torch_model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(rotary) != 1 or getattr(rotary[0], "rope_type", "default") in LENGTH_DEPENDENT_ROPE:
        return None
    positions = torch.arange(int(text.max_position_embeddings), device=torch_model.device)[None]
    with torch.no_grad():
        cos, sin = rotary[0](torch.zeros(1, dtype=torch.float32, device=torch_model.device), positions)
    half = cos.shape[-1] // 2  # Hugging Face repeats the frequencies: cat(freqs, freqs)
    return cos[0, :, :half].float().cpu().numpy(), sin[0, :, :half].float().cpu().numpy()


def _check_dtype_device(dtype: str, device: str) -> None:
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype} is not supported by --builder torch; choose one of "
                        f"{', '.join(EXPORT_DTYPES)} (int4: --builder genai)")
    resolve_device(device)  # fp16 on cpu works (onnxruntime runs it; checked in tests), if slowly


def _export_program(torch_model, adapter, opset):
    import warnings

    import torch
    from torch.export import Dim

    num_layers = torch_model.config.num_hidden_layers
    device = torch_model.device
    ids = torch.randint(3, torch_model.config.get_text_config().vocab_size, (SAMPLE_BATCH, SAMPLE_SEQ), device=device)
    mask = torch.ones(SAMPLE_BATCH, SAMPLE_PAST + SAMPLE_SEQ, dtype=torch.long, device=device)
    positions = torch.arange(SAMPLE_PAST, SAMPLE_PAST + SAMPLE_SEQ, device=device).expand(SAMPLE_BATCH, -1)
    with torch.no_grad():  # one run without cache, to learn the cache's shape
        cache_shape = flat_cache_module(torch_model, True)(ids, mask[:, :SAMPLE_SEQ], positions, [])[1].shape
    past = [torch.zeros(SAMPLE_BATCH, cache_shape[1], SAMPLE_PAST, cache_shape[3],
                        dtype=torch_model.dtype, device=device) for _ in range(2 * num_layers)]
    batch, seq, past_len = Dim("batch"), Dim("sequence_length"), Dim("past_sequence_length")
    args = (ids, mask, positions, past)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: Dim.DYNAMIC}, {0: batch, 1: seq},
               [{0: batch, 2: past_len} for _ in past])
    inputs = ["input_ids", "attention_mask", "position_ids"]
    if not adapter.onnx_position_ids:
        args, dynamic, inputs = args[:2] + args[3:], dynamic[:2] + dynamic[3:], inputs[:2]
    cache_in = cache_names(num_layers, "past_key_values")
    cache_out = cache_names(num_layers, "present")
    try:
        _skip_torchvision_notes()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter warns at length about harmless things
            program = torch.onnx.export(
                flat_cache_module(torch_model, adapter.onnx_position_ids), args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic,
                input_names=inputs + [n for pair in cache_in for n in pair],
                output_names=["logits"] + [n for pair in cache_out for n in pair], verbose=False,
                optimize=False)  # _save_verified folds constants and fuses once
    except Exception as exc:  # the exporter's own errors are long; the first line says what broke
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"torch.onnx could not export '{adapter.model_type}': {first}") from None
    graph = program.model.graph
    _rename_dim(graph.inputs[1], 1, "total_sequence_length")
    shapes = dict(num_layers=num_layers, num_kv_heads=int(cache_shape[1]), head_dim=int(cache_shape[3]),
                  inputs=inputs, cache_inputs=cache_in, cache_outputs=cache_out,
                  io_shapes={v.name: [d if isinstance(d, int) else str(d) for d in v.shape]
                             for v in [*graph.inputs, *graph.outputs]})
    missing = {n for n in inputs + [n for p in cache_in for n in p]} - {v.name for v in graph.inputs}
    if missing:
        raise UserError(f"the exported '{adapter.model_type}' graph lacks inputs {sorted(missing)}")
    return program, shapes


def _skip_torchvision_notes() -> None:
    """The exporter's registry logs 'torchvision is not installed. Skipping torchvision::nms' (and three
    more) on every export: nothing a user of a language model can act on. Dropped at that logger only."""
    import logging

    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    if not any(isinstance(f, _NoTorchvisionNote) for f in registry.filters):
        registry.addFilter(_NoTorchvisionNote())


class _NoTorchvisionNote:
    def filter(self, record) -> bool:
        return "torchvision is not installed" not in record.getMessage()


def _rename_dim(value, axis: int, name: str) -> None:
    import onnx_ir as ir

    dims = list(value.shape)
    dims[axis] = ir.SymbolicDim(name)
    value.shape = ir.Shape(dims)


def _save(ir_model, folder: Path) -> str | None:
    """Write model.onnx (and model.onnx.data when the weights pass 2 GB); the data file's name or None."""
    import onnx_ir as ir

    size = sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)
    data = f"{ONNX_FILE}.data" if size > EXTERNAL_DATA_LIMIT else None
    ir.save(ir_model, folder / ONNX_FILE, external_data=data)
    return data


def _save_verified(program, folder: Path, torch_model, adapter, opset, shapes, dtype, variants, rotary=None):
    """Save the graph, fused for onnxruntime (the first of `variants` that keeps parity with PyTorch),
    its cache shared (`share_kv_buffer`) where `rotary` tables are given; returns (external data file,
    fusions, parity, shapes of the saved graph).

    The fusions rewrite the graph in place, so a fused graph that fails is replaced by a fresh
    trace, not by a copy kept on disk (that would double the disk a 70B export needs).
    """
    from onnxscript.optimizer import optimize as fold_constants

    from .ort_fusions import fuse_for_ort, share_kv_buffer

    tolerance = TOLERANCES[dtype]
    device = str(torch_model.device.type)
    fusions = {"applied": {}, "kept": False, "skipped": "--no-optimize", "tried": []}
    tried = set()
    for variant in variants:
        if variant in tried:
            continue
        if fusions["tried"]:
            program, shapes = _export_program(torch_model, adapter, opset)
        fused, counts = fuse_for_ort(program.model, grouped_query_attention=variant.startswith("gqa"))
        if variant == "gqa-shared":
            counts["shared_kv"] = share_kv_buffer(fused, *rotary)
            variant = variant if counts["shared_kv"] else "gqa"  # no node had the shared form: plain gqa
        tried.add(variant)
        saved = _shapes_of(fused, shapes, counts.get("shared_kv"), rotary)
        data = _save(fused, folder)
        attempt = {"variant": variant, "applied": {k: v for k, v in counts.items() if v}}
        try:
            error = _parity_error(folder, saved, dtype, torch_model, device)
        except Exception as exc:  # onnxruntime rejects some fused graphs outright (e.g. rank-3 Gemm)
            error, attempt["failure"] = float("inf"), f"{type(exc).__name__}: {str(exc)[:200]}"
        attempt["relative_error"] = error if error < float("inf") else None
        fusions = {**attempt, "kept": error <= tolerance, "tried": [*fusions["tried"], attempt]}
        if fusions["kept"]:
            return data, fusions, _parity(error, tolerance), saved
        for path in folder.glob(f"{ONNX_FILE}*"):
            path.unlink()
    if fusions["tried"]:
        program, shapes = _export_program(torch_model, adapter, opset)
    fold_constants(program.model)
    data = _save(program.model, folder)
    return data, fusions, _parity(_parity_error(folder, shapes, dtype, torch_model, device), tolerance), shapes


def _shapes_of(ir_model, shapes: dict, shared: int | None, rotary) -> dict:
    """`shapes` for the graph as saved: its inputs and I/O shapes, and its cache layout."""
    graph = ir_model.graph
    cache = {n for pair in shapes["cache_inputs"] for n in pair}
    updated = dict(shapes, kv_cache="shared" if shared else "concat",
                   inputs=[v.name for v in graph.inputs if v.name not in cache],
                   io_shapes={v.name: [d if isinstance(d, int) else str(d) for d in v.shape]
                              for v in [*graph.inputs, *graph.outputs]})
    if shared:
        updated["max_sequence_length"] = int(rotary[0].shape[0])
    return updated

def _parity(error: float, tolerance: float) -> dict:
    if error > tolerance:
        raise UserError(f"the exported graph does not match PyTorch (relative logit error {error:.2e} "
                        f"> {tolerance:g}); refusing to write a broken export")
    return {"relative_logit_error": error, "tolerance": tolerance, "greedy_steps": PROBE_STEPS}


def _parity_error(folder: Path, shapes: dict, dtype: str, torch_model, device: str) -> float:
    """Worst per-step relative logit error of a short left-padded greedy run, ONNX vs PyTorch."""
    import torch

    from ..runtime.ort import OnnxDecoder

    write_manifest(folder, {"kind": "onnx", "onnx": _onnx_section(shapes, dtype, None, None)})
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, torch_model.config.get_text_config().vocab_size, (2, 8), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    _, expected = torch_greedy(torch_model, ids.to(torch_model.device), mask.to(torch_model.device), PROBE_STEPS)
    actual = OnnxDecoder(folder, device).greedy(ids.numpy(), mask.numpy(), PROBE_STEPS, keep_logits=True).logits
    return max(relative_error(a, e) for a, e in zip(actual, expected))


def _onnx_section(shapes: dict, dtype: str, opset, external_data) -> dict:
    return {"file": ONNX_FILE, "external_data": external_data, "dtype": dtype, "opset": opset, "inputs": shapes["inputs"],
            "outputs": ["logits"] + [n for pair in shapes["cache_outputs"] for n in pair],
            "cache_inputs": shapes["cache_inputs"], "cache_outputs": shapes["cache_outputs"],
            "num_kv_heads": shapes["num_kv_heads"], "head_dim": shapes["head_dim"],
            "kv_cache": shapes.get("kv_cache", "concat"), "max_sequence_length": shapes.get("max_sequence_length"),
            "io_shapes": shapes["io_shapes"]}


def _manifest(model_dir, config, source_manifest, shapes, dtype, device, opset, data, fusions, parity) -> dict:
    manifest = {
        "kind": "onnx",
        "source": str(Path(model_dir).absolute()),
        "model_type": config["model_type"],
        "exporter": "torch.onnx.export(dynamo=True)",
        "device": device,
        "onnx": _onnx_section(shapes, dtype, opset, data),
        "optimizations": fusions,
        "parity_check": parity,
        **lineage(source_manifest, shapes["num_layers"]),
    }
    manifest["graphs"] = [graph_entry(ONNX_FILE, manifest["cache_to_original_layer"],
                                      external_data=data, kv_cache=shapes.get("kv_cache", "concat"))]
    return manifest
