"""Physical pruning: write a checkpoint that holds only the planned layers, renumbered 0..K-1."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint as ckpt
from .checkpoint import load_model_info
from .families import remap_config
from .errors import UserError
from .artifact import Artifact, file_sha256, write_manifest
from .outputs import atomic_output_dir
from .plan.positional import LayerPlan, make_plan
from .progress import progress_bar


@dataclass(frozen=True)
class PruneResult:
    out_dir: Path
    plan: LayerPlan
    manifest: dict
    seconds: float


def plan_for_model(model: str | Path, speedup=None, strategy="uls", keep=None, skip=None) -> LayerPlan:
    _, config, adapter = load_model_info(model)
    return make_plan(adapter.num_layers(config), speedup, strategy, keep, skip, adapter.shape(config))


def prune_checkpoint(
    model: str | Path,
    out: str | Path,
    plan: LayerPlan,
    force: bool = False,
    allow_pickle: bool = False,
    max_shard_bytes: int = ckpt.DEFAULT_MAX_SHARD_BYTES,
    quiet: bool = False,
) -> PruneResult:
    """Stream `model`'s tensors into `out`, dropping the layers `plan` skips and renumbering the rest."""
    start = time.perf_counter()
    model_dir, config, adapter = load_model_info(model)
    num_layers = adapter.num_layers(config)
    if plan.num_layers != num_layers:
        raise UserError(f"the plan is for {plan.num_layers} layers but {model_dir} has {num_layers}")
    infos = ckpt.checkpoint_tensors(model_dir, allow_pickle)
    entries = _renamed_entries(infos, adapter, plan, num_layers)
    new_config = remap_config(config, adapter, list(plan.kept),
                              ckpt.materialized_per_layer_fields(model_dir, adapter.per_layer_lists))
    source_manifest = Artifact.open(model_dir).record
    manifest = {
        "kind": "hf-checkpoint",
        "source": str(Path(model_dir).absolute()),
        "source_config_sha256": file_sha256(model_dir / ckpt.CONFIG_NAME),
        "model_type": config["model_type"],
        "strategy": plan.strategy,
        "speedup_target": plan.speedup_target,
        "num_layers_original": num_layers,
        "kept": list(plan.kept),
        "new_to_original": {str(new): orig for new, orig in plan.new_to_original.items()},
        "plan": plan.to_dict(),
    }
    if source_manifest:
        manifest["source_manifest"] = source_manifest
    with atomic_output_dir(Path(out), force, protect=(model_dir,)) as tmp:
        total = sum(info.nbytes for _, info in entries)
        with progress_bar(total, "pruning", unit="B", quiet=quiet) as bar:
            ckpt.write_sharded(tmp, entries, max_shard_bytes, on_tensor=bar.update)
        (tmp / ckpt.CONFIG_NAME).write_text(_json(new_config))
        ckpt.copy_side_files(model_dir, tmp)
        write_manifest(tmp, manifest)
    return PruneResult(Path(out), plan, manifest, time.perf_counter() - start)


def _renamed_entries(infos, adapter, plan: LayerPlan, num_layers: int):
    new_index = {orig: new for new, orig in plan.new_to_original.items()}
    seen_layers = set()
    entries = []
    for info in infos:
        layer = adapter.layer_index(info.name)
        if layer is None:
            entries.append((info.name, info))
            continue
        seen_layers.add(layer)
        if layer in new_index:
            entries.append((adapter.rename_layer(info.name, new_index[layer]), info))
    if seen_layers != set(range(num_layers)):
        raise UserError(
            f"the checkpoint's tensors hold layers {_span(seen_layers)} but its config says "
            f"{num_layers}; it does not match the '{adapter.model_type}' layout"
        )
    return entries


def _span(layers: set[int]) -> str:
    return f"0..{max(layers)} ({len(layers)} distinct)" if layers else "none"


def _json(data: dict) -> str:
    import json

    return json.dumps(data, indent=2) + "\n"
