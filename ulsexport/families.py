"""Architecture adapters: everything that differs between model families, in one table.

An adapter says where a family keeps its decoder layers in a checkpoint, which config field
counts them, which config fields hold one entry per layer (and so must be remapped when layers
go), and what the per-token cost model needs. No other module branches on ``model_type``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UserError
from .plan.positional import MAX_LAYERS, ModelShape


@dataclass(frozen=True)
class Adapter:
    model_type: str
    # Matches a decoder-layer tensor name; group 1 is the text before the index, group 2 the index.
    layer_key: str = r"^((?:model\.)?layers\.)(\d+)\."
    num_layers_field: str = "num_hidden_layers"
    # Config lists with one entry per layer: sliced to the kept layers.
    per_layer_lists: tuple[str, ...] = ()
    # Config ints "layers below this index are X": recounted over the kept layers.
    per_layer_thresholds: tuple[str, ...] = ()
    # Config lists of layer indices: filtered to kept layers and renumbered.
    per_layer_indices: tuple[str, ...] = ()
    # Config field names for the cost model, where the family names them differently.
    hidden_field: str = "hidden_size"
    intermediate_field: str = "intermediate_size"
    heads_field: str = "num_attention_heads"
    kv_heads_field: str = "num_key_value_heads"
    experts_per_token_field: str | None = None
    mlp_matrices: int = 3
    # Families whose MLP width defaults to a multiple of hidden when the config leaves it unset.
    default_intermediate_multiple: int = 4
    # ONNX export: whether the graph takes position_ids, which transformers experts kernel traces
    # (the default grouped_mm has no ONNX translation), and whether the family exports at all.
    onnx_position_ids: bool = True
    onnx_experts_implementation: str | None = None
    onnx_exportable: bool = True
    onnx_note: str = ""
    extra: dict = field(default_factory=dict)

    def layer_index(self, tensor_name: str) -> int | None:
        m = re.match(self.layer_key, tensor_name)
        return int(m.group(2)) if m else None

    def rename_layer(self, tensor_name: str, new_index: int) -> str:
        return re.sub(self.layer_key, lambda m: f"{m.group(1)}{new_index}.", tensor_name, count=1)

    def num_layers(self, config: dict) -> int:
        """The config's layer count, refused unless a whole number within MAX_LAYERS."""
        value = _config_int(config, self.num_layers_field)
        if value > MAX_LAYERS:
            raise UserError(f"config field '{self.num_layers_field}' is {value}; ulsexport handles at most "
                            f"{MAX_LAYERS} layers (is config.json right?)")
        return value

    def shape(self, config: dict) -> ModelShape:
        hidden = _config_int(config, self.hidden_field, minimum=1)
        heads = _config_int(config, self.heads_field, minimum=1)
        kv_heads = _config_int(config, self.kv_heads_field, minimum=1, default=heads)
        inter = _config_int(config, self.intermediate_field, default=self.default_intermediate_multiple * hidden)
        experts = _config_int(config, self.experts_per_token_field, minimum=1, default=1) \
            if self.experts_per_token_field else 1
        return ModelShape(
            hidden_size=hidden,
            intermediate_size=inter,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=_config_int(config, "head_dim", minimum=1, default=max(hidden // heads, 1)),
            vocab_size=_config_int(config, "vocab_size", minimum=1),
            mlp_matrices=self.mlp_matrices,
            experts_per_token=experts,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


_REQUIRED = object()


def _config_int(config: dict, name: str, minimum: int = 0, default=_REQUIRED) -> int:
    """A whole-number config field (not a bool, text or float), at least `minimum`; `default` where
    the field is missing or null (required when no default is given)."""
    value = config.get(name)
    if value is None:
        if default is _REQUIRED:
            raise UserError(f"config.json has no '{name}' (a whole number); is it a complete checkpoint config?")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        text = repr(value)
        text = text if len(text) <= 40 else text[:40] + "..."
        raise UserError(f"config field '{name}' must be a whole number, not {text}")
    if value < minimum:
        raise UserError(f"config field '{name}' is {value}; it must be at least {minimum}")
    return value


_QWEN = dict(per_layer_lists=("layer_types",), per_layer_thresholds=("max_window_layers",))
_GEMMA = dict(per_layer_lists=("layer_types",))

ADAPTERS: dict[str, Adapter] = {a.model_type: a for a in [
    Adapter("llama"),
    Adapter("mistral"),
    Adapter("qwen2", **_QWEN),
    Adapter("qwen3", **_QWEN),
    Adapter("gemma2", **_GEMMA),
    Adapter("gemma3_text", **_GEMMA),
    Adapter("phi3"),
    Adapter("olmo2"),
    Adapter("granite"),
    Adapter("mixtral", experts_per_token_field="num_experts_per_tok", onnx_experts_implementation="batched_mm"),
    Adapter("gpt2", layer_key=r"^((?:transformer\.)?h\.)(\d+)\.", num_layers_field="n_layer",
            hidden_field="n_embd", intermediate_field="n_inner", heads_field="n_head",
            kv_heads_field="n_head", mlp_matrices=2),
    Adapter("opt", layer_key=r"^((?:model\.)?decoder\.layers\.)(\d+)\.",
            intermediate_field="ffn_dim", kv_heads_field="num_attention_heads", mlp_matrices=2),
    Adapter("gpt_neox", layer_key=r"^((?:gpt_neox\.)?layers\.)(\d+)\.",
            kv_heads_field="num_attention_heads", mlp_matrices=2),
]}

SUPPORTED_MODEL_TYPES = tuple(ADAPTERS)

# What a model can do, read from its config rather than its family: these decide which graph
# (shared or concatenated KV cache) an export can take.
# onnxruntime's CPU GroupQueryAttention (and its rotary kernel) take only head sizes that are multiples of 16.
CPU_GQA_HEAD_MULTIPLE = 16
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")  # transformers' rope types whose frequencies follow the length


def attends_locally(text_config) -> bool:
    """Whether any layer attends through a sliding window, from the config fields transformers reads."""
    if not getattr(text_config, "sliding_window", None):
        return False
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types:
        return any(kind != "full_attention" for kind in layer_types)
    return getattr(text_config, "use_sliding_window", True) is not False


def adapter_for(config: dict) -> Adapter:
    if not isinstance(config, dict):
        raise UserError("config.json is not a JSON object of config fields")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in ADAPTERS:
        model_type = model_type if isinstance(model_type, str) else repr(model_type)[:40]
        raise UserError(
            f"model_type '{model_type}' is not supported (supported: {', '.join(ADAPTERS)}); "
            "to add it, add an Adapter row to ADAPTERS in ulsexport/adapters.py"
        )
    return ADAPTERS[model_type]


def remap_config(config: dict, adapter: Adapter, kept: list[int], materialized: dict) -> dict:
    """The config of the pruned model: layer count set, every per-layer field remapped.

    `materialized` holds per-layer fields that the family derives when the config omits them
    (transformers computes `layer_types` from other fields); they are written out explicitly so
    the pruned model cannot re-derive them for the wrong layers.
    """
    num_layers = adapter.num_layers(config)
    out = dict(config)
    out[adapter.num_layers_field] = len(kept)
    handled = {adapter.num_layers_field}
    for name in adapter.per_layer_lists:
        values = config.get(name, materialized.get(name))
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != num_layers:
            count = f"{len(values)} entries" if isinstance(values, list) else "no list"
            raise UserError(f"config field '{name}' has {count} for {num_layers} layers")
        out[name] = [values[i] for i in kept]
        handled.add(name)
    for name in adapter.per_layer_thresholds:
        if config.get(name) is not None:
            threshold = _config_int(config, name)
            out[name] = sum(1 for i in kept if i < threshold)
            handled.add(name)
    for name in adapter.per_layer_indices:
        if config.get(name) is not None:
            if not isinstance(config[name], list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in config[name]):
                raise UserError(f"config field '{name}' must be a list of layer indices")
            new_index = {orig: new for new, orig in enumerate(kept)}
            out[name] = [new_index[i] for i in config[name] if i in new_index]
            handled.add(name)
    for name, value in config.items():
        if name not in handled and isinstance(value, list) and len(value) == num_layers > 1:
            raise UserError(
                f"config field '{name}' has one entry per layer and ulsexport does not know how to "
                f"remap it for '{adapter.model_type}'; add it to that adapter in ulsexport/adapters.py"
            )
    return out
