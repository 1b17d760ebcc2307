"""onnxruntime-genai's model builder as a second ONNX builder, and the genai_config.json that makes
an export of either builder load in onnxruntime-genai (its runtime is `ulsexport.runtime.genai`).

`build_genai` runs onnxruntime-genai's model builder (used as the library it is) on a pruned
checkpoint. The builder reads per-layer facts from the config (`layer_types`, which the prune
step has already sliced to the kept layers), so a pruned checkpoint needs nothing special. Its
graphs use fused kernels (GroupQueryAttention with rotary embedding inside, fused layer norms)
and one KV buffer shared by past and present.

`write_genai_config` makes an export of `--builder torch` loadable by `onnxruntime_genai.Model`
too, through genai's generic "decoder" model type (everything model-specific is inside the graph).
A graph with a shared cache takes the mask as the builder's graphs do (lengths from it), and
genai shares its past and present buffer on CUDA, as it does for the builder's; a graph with a
concatenated cache returns a new present tensor each step (past_present_share_buffer off).
"""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

from ..artifact import GENAI_CONFIG, Artifact, BuildResult, graph_entry, lineage, write_manifest
from ..errors import UserError, first_line
from ..families import CPU_GQA_HEAD_MULTIPLE
from ..outputs import atomic_output_dir
BUILDER_PRECISIONS = ("fp32", "fp16", "int4")
# (precision, device) pairs the builder accepts, from its own list of valid combinations.
BUILDER_TARGETS = {("fp32", "cpu"), ("fp32", "cuda"), ("fp16", "cuda"), ("int4", "cpu"), ("int4", "cuda")}
USE_TORCH = "use --builder torch"


def build_genai(model, out, dtype: str = "fp32", device: str = "cpu", force: bool = False, quiet: bool = False,
                extra_options: tuple[str, ...] = ()):
    """Build `model` (a checkpoint directory) with onnxruntime-genai's model builder into `out`;
    `extra_options` are the builder's own KEY=VALUE options (e.g. use_paged_attention=true, for its Engine)."""
    from ..checkpoint import load_model_info
    from ..tokenizer import load_tokenizer
    from ..runtime.genai import import_genai

    start = time.perf_counter()
    model_dir, config, adapter = load_model_info(model)
    _check_buildable(model_dir, config, adapter, dtype, device)
    import_genai()
    load_tokenizer(model_dir)  # the builder copies the tokenizer and fails without one
    out = Path(out)
    with atomic_output_dir(out, force, protect=(model_dir,)) as tmp:
        _run_builder(model_dir, tmp, dtype, device, config["model_type"], quiet, extra_options)
        genai_config = json.loads((tmp / GENAI_CONFIG).read_text())
        decoder = genai_config["model"]["decoder"]
        manifest = {
            "kind": "onnx",
            "builder": "genai",
            "source": str(Path(model_dir).absolute()),
            "model_type": config["model_type"],
            "exporter": "onnxruntime_genai.models.builder",
            "device": device,
            "genai_config": GENAI_CONFIG,
            "onnx": _onnx_section(decoder, genai_config, dtype),
            **lineage(Artifact.open(model_dir).record, decoder["num_hidden_layers"]),
        }
        manifest["graphs"] = [graph_entry(decoder["filename"], manifest["cache_to_original_layer"])]
        write_manifest(tmp, manifest)
    return BuildResult(out, manifest, time.perf_counter() - start)


def _onnx_section(decoder: dict, genai_config: dict, dtype: str) -> dict:
    """The manifest's `onnx` section of a builder graph, in the terms `runtime.ort.OnnxDecoder` reads:
    the builder's graphs take the attention mask and append to a cache buffer shared by past and
    present, as the torch builder's shared-cache graphs do, so our loop runs them too."""
    io, outputs, layers = decoder["inputs"], decoder["outputs"], range(decoder["num_hidden_layers"])
    cache_inputs = [(io["past_key_names"] % i, io["past_value_names"] % i) for i in layers]
    cache_outputs = [(outputs["present_key_names"] % i, outputs["present_value_names"] % i) for i in layers]
    return {"file": decoder["filename"], "dtype": dtype, "genai_io": {"inputs": io, "outputs": outputs},
            "inputs": [name for role, name in io.items() if not role.endswith("_names")],
            "outputs": [outputs["logits"], *[n for pair in cache_outputs for n in pair]],
            "cache_inputs": cache_inputs, "cache_outputs": cache_outputs, "kv_cache": "shared",
            "max_sequence_length": genai_config["model"]["context_length"],
            "num_kv_heads": decoder["num_key_value_heads"], "head_dim": decoder["head_size"],
            "io_shapes": {"logits": ["batch_size", "sequence_length", genai_config["model"]["vocab_size"]]}}


def _check_buildable(model_dir: Path, config: dict, adapter, dtype: str, device: str) -> None:
    """Refuse, before any work, what the builder or onnxruntime would get wrong."""
    from .. import checkpoint as ckpt

    ckpt.weight_files(model_dir, allow_pickle=False)  # the builder reads the weights itself: no pickle
    if dtype not in BUILDER_PRECISIONS:
        raise UserError(f"--dtype {dtype} is not offered for --builder genai; choose one of "
                        f"{', '.join(BUILDER_PRECISIONS)}")
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{device}'; choose cpu or cuda")
    if (dtype, device) not in BUILDER_TARGETS:
        raise UserError(f"onnxruntime-genai's builder makes no {dtype} model for {device}; "
                        "use fp32 or int4 on cpu, fp16 on cuda")
    shape = adapter.shape(config)
    if device == "cpu" and shape.head_dim % CPU_GQA_HEAD_MULTIPLE:
        raise UserError(f"onnxruntime's CPU GroupQueryAttention needs a head size that is a multiple of "
                        f"{CPU_GQA_HEAD_MULTIPLE}, and this model's is {shape.head_dim}; {USE_TORCH}")
    window, context = config.get("sliding_window"), config.get("max_position_embeddings")
    if window and context and window < context and not config.get("layer_types"):
        # The builder learns which layers slide only from layer_types; without it, it builds
        # full attention everywhere (measured on phi3: wrong logits past the window).
        raise UserError(f"this '{config['model_type']}' config has sliding_window {window} but no layer_types, "
                        f"which onnxruntime-genai's builder needs to apply the window; {USE_TORCH}")
    clashing = _vocab_wide_linears(model_dir)
    if clashing:
        raise UserError(f"onnxruntime-genai's builder takes every linear layer with vocab_size ({shape.vocab_size}) "
                        f"outputs for the LM head, and this model has others ({clashing[0]}); {USE_TORCH}")


def _vocab_wide_linears(model_dir: Path) -> list[str]:
    """Linear layers other than the LM head whose output width is the vocabulary size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # the module tree only, no weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    vocab, head = model.config.get_text_config().vocab_size, model.get_output_embeddings()
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module.out_features == vocab and module is not head]


def _run_builder(model_dir: Path, out: Path, dtype: str, device: str, model_type: str, quiet: bool,
                 extra_options: tuple[str, ...] = ()) -> None:
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    log = io.StringIO()
    quieted = (contextlib.redirect_stdout(log), contextlib.redirect_stderr(log)) if quiet else ()
    with tempfile.TemporaryDirectory() as cache, contextlib.ExitStack() as stack:
        for redirect in quieted:
            stack.enter_context(redirect)
        try:
            options = parse_extra_options(None, str(model_dir), str(out), dtype, device, cache, list(extra_options))
            create_model(None, str(model_dir), str(out), dtype, device, cache, **options)
        except NotImplementedError as exc:
            raise UserError(f"onnxruntime-genai's builder does not handle '{model_type}' "
                            f"({first_line(exc)}); {USE_TORCH}") from None
        except Exception as exc:  # the builder's own errors: say which, and the way around it
            raise UserError(f"onnxruntime-genai's builder failed on '{model_type}': {type(exc).__name__}: "
                            f"{first_line(exc)}; {USE_TORCH}") from None




def write_genai_config(onnx_dir) -> Path:
    """Write genai_config.json for an export of `--builder torch` (model.onnx + ulsexport.json)."""
    from transformers import AutoConfig

    onnx_dir = Path(onnx_dir)
    artifact = Artifact.open(onnx_dir)
    onnx = artifact.manifest["onnx"]
    text = AutoConfig.from_pretrained(onnx_dir).get_text_config()
    generation = _generation_ids(onnx_dir, text)
    context = int(getattr(text, "max_position_embeddings", None) or 2048)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if "position_ids" in onnx["inputs"]:
        inputs["position_ids"] = "position_ids"
    on_cuda = artifact.get("device", "cpu").startswith("cuda")
    providers = [{"cuda": {}}] if on_cuda else []
    config = {
        "model": {
            **generation,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": providers},
                "filename": onnx["file"],
                "head_size": onnx["head_dim"],
                "hidden_size": text.hidden_size,
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": text.num_attention_heads,
                "num_hidden_layers": len(onnx["cache_inputs"]),
                "num_key_value_heads": onnx["num_kv_heads"],
            },
            "type": "decoder",
            "vocab_size": text.vocab_size,
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": context,
                   "past_present_share_buffer": on_cuda and onnx.get("kv_cache") == "shared"},
    }
    path = onnx_dir / GENAI_CONFIG
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def _generation_ids(folder: Path, text_config) -> dict:
    """bos/eos/pad token ids, generation_config.json first; genai needs a pad id, eos stands in."""
    generation_path = folder / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    ids = {name: generation.get(name, getattr(text_config, name, None))
           for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    eos = ids["eos_token_id"]
    first_eos = eos[0] if isinstance(eos, list) else eos
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = first_eos if first_eos is not None else 0
    return {name: value for name, value in ids.items() if value is not None}
