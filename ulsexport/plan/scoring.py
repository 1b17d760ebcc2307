"""Layer plans chosen from calibration data: block influence, angular distance, greedy perplexity.

- ``bi`` (ShortGPT, arXiv:2403.03853): block influence of layer i = 1 - cos(input_i, output_i),
  averaged over calibration tokens; the K most influential layers are kept.
- ``angular`` (Gromov et al., arXiv:2403.17887): for n = L - K, the angular distance
  arccos(cos(input_l, input_{l+n})) / pi averaged over tokens; the block l..l+n-1 with the
  smallest distance is dropped.
- ``greedy-ppl`` (in the spirit of SLEB, arXiv:2402.09025): remove the layer whose removal raises
  calibration perplexity least, re-score the rest, repeat until K layers are left.

Policy shared by all three: the first and the last layer are never removed (``PROTECTED``). The
first layer turns embeddings into the residual stream and the last feeds the head; ULS keeps
both too, so every strategy here differs from ULS only in the middle layers.

Memory. ``bi`` and ``angular`` stream the model: parameters are built on the meta device, the
embeddings and final norm are loaded, and each decoder layer is read from the safetensors files
just before it runs and dropped right after. What is held is those outside weights, one layer,
and the hidden states of one calibration batch (angular also keeps n earlier layer inputs of
that batch, n = L - K). Checkpoints whose tensor names do not match the model's parameters
(weights that transformers converts on load, e.g. Mixtral's experts) are loaded whole instead,
and the scores say ``"streamed": false``. ``greedy-ppl`` loads the whole model in fp32 on the
device (4 bytes a parameter) and runs one forward over the calibration tokens for every
candidate at every step, the candidate's layer dropped from the layer list (not replaced by an
identity), about (L - K) * L forwards in all.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .positional import POSITIONAL_STRATEGIES, LayerPlan, num_kept_for_speedup, plan_for_kept
from ..progress import progress_bar

DATA_STRATEGIES = ("bi", "angular", "greedy-ppl")
STRATEGIES = POSITIONAL_STRATEGIES + DATA_STRATEGIES


def strategy_name(strategy: str) -> str:
    """A strategy named in any case (--strategy BI), as the plans name it; one line listing every strategy
    otherwise."""
    name = strategy.strip().lower() if isinstance(strategy, str) else strategy
    if name not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return name
CALIB_WINDOW = 256
DEFAULT_CALIB_TOKENS = 8192
MIN_CALIB_TOKENS = 64
BATCH_WINDOWS = 8


def protected_layers(num_layers: int) -> tuple[int, int]:
    return (0, num_layers - 1)


@dataclass(frozen=True)
class Calibration:
    """Calibration token windows, and where they came from."""

    windows: list[list[int]]
    sha256: str     # of the calibration text, before it was cut to max_tokens
    source: str

    @property
    def num_tokens(self) -> int:
        return sum(len(w) for w in self.windows)

    def describe(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "tokens": self.num_tokens,
                "window": CALIB_WINDOW}


def calibration_from_text(tokenizer, text: str, source: str,
                          max_tokens: int = DEFAULT_CALIB_TOKENS) -> Calibration:
    from ..quality import token_windows

    if max_tokens < MIN_CALIB_TOKENS:
        raise UserError(f"--calib-tokens must be at least {MIN_CALIB_TOKENS} (got {max_tokens})")
    windows = token_windows(tokenizer, text, CALIB_WINDOW, max_tokens)
    found = sum(len(w) for w in windows)
    if found < MIN_CALIB_TOKENS:
        raise UserError(f"calibration text {source} gives {found} tokens; at least {MIN_CALIB_TOKENS} are needed")
    return Calibration(windows, hashlib.sha256(text.encode("utf-8")).hexdigest(), source)


def read_calibration(tokenizer, path: str | Path | None, max_tokens: int = DEFAULT_CALIB_TOKENS) -> Calibration:
    from ..quality import read_text

    if path is None:
        raise UserError(f"--calib FILE is needed by the data strategies ({', '.join(DATA_STRATEGIES)})")
    try:
        text = read_text(path)
    except UserError as exc:
        raise UserError(f"--calib: {exc}") from None
    return calibration_from_text(tokenizer, text, str(path), max_tokens)


# ---------------------------------------------------------------- running the model

def _batches(windows: list[list[int]], device):
    """(input_ids, attention_mask) batches, right-padded with token 0 under a zero mask."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    for start in range(0, len(windows), BATCH_WINDOWS):
        rows = [torch.tensor(w) for w in windows[start:start + BATCH_WINDOWS]]
        ids = pad_sequence(rows, batch_first=True)
        mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
        yield ids.to(device), mask.to(device)


def _layer_list_owner(model):
    """(parent module, attribute name) of the decoder-layer ModuleList."""
    from ..models import decoder_layers

    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            parent, _, attr = name.rpartition(".")
            return model.get_submodule(parent), attr
    raise UserError(f"could not find the decoder layers of {type(model).__name__}")


@contextlib.contextmanager
def kept_layers_only(model, kept):
    """The model with only the `kept` decoder layers, in order, until the block ends.

    The config's layer count and per-layer lists (layer_types: some families pick each layer's
    attention mask by position) follow the kept layers too. The cache is turned off, so the kept
    layers' original layer_idx never matters.
    """
    import torch

    from ..families import adapter_for

    config = model.config
    adapter = adapter_for(config.to_dict())
    parent, attr = _layer_list_owner(model)
    full = getattr(parent, attr)
    saved = {name: getattr(config, name) for name in (adapter.num_layers_field, *adapter.per_layer_lists)
             if getattr(config, name, None) is not None}
    for name, value in saved.items():
        setattr(config, name, len(kept) if name == adapter.num_layers_field else [value[i] for i in kept])
    saved["use_cache"], config.use_cache = config.use_cache, False   # a cache would index by layer_idx
    setattr(parent, attr, torch.nn.ModuleList([full[i] for i in kept]))
    try:
        yield model
    finally:
        setattr(parent, attr, full)
        for name, value in saved.items():
            setattr(config, name, value)


def _hidden(value):
    return value[0] if isinstance(value, tuple) else value


def _to_device_float(tensor, device):
    import torch

    return tensor.to(device=device, dtype=torch.float32 if tensor.is_floating_point() else tensor.dtype)


@contextlib.contextmanager
def _params_on_meta():
    """Build modules with every parameter on the meta device and every buffer real (rotary tables)."""
    import torch

    register = torch.nn.Module.register_parameter

    def to_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _set_param(root, name: str, tensor) -> None:
    import torch

    parent, _, leaf = name.rpartition(".")
    root.get_submodule(parent)._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)


@contextlib.contextmanager
def streamed_base_model(model_dir: Path, device: str):
    """The checkpoint's base model (no LM head) with decoder layers loaded one at a time as they run.

    Yields None when the checkpoint's tensor names do not match the model's parameters.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .. import checkpoint as ckpt
    from ..models import decoder_layers

    with _params_on_meta():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).eval()
    base, prefix = model.base_model, model.base_model_prefix
    infos = {i.name: i for i in ckpt.checkpoint_tensors(model_dir)}
    sources = {}
    for name, _ in base.named_parameters():
        info = infos.get(f"{prefix}.{name}") or infos.get(name)
        if info is None:
            yield None
            return
        sources[name] = info
    layers = decoder_layers(base)
    layer_prefix = next(n for n, m in base.named_modules() if m is layers) + "."

    def load(root, names):
        for name in names:
            _set_param(root, name, _to_device_float(ckpt.read_tensor(sources[name]), device))

    for module in base.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    load(base, [n for n in sources if not n.startswith(layer_prefix)])
    handles = []
    for i, layer in enumerate(layers):
        own = [n for n in sources if n.startswith(f"{layer_prefix}{i}.")]

        def materialize(module, args, own=own):
            load(base, own)

        def release(module, args, output, own=own):
            for name in own:
                _set_param(base, name, torch.empty_like(base.get_parameter(name), device="meta"))

        handles += [layer.register_forward_pre_hook(materialize), layer.register_forward_hook(release)]
    try:
        yield base
    finally:
        for h in handles:
            h.remove()


def similarity_scores(base_model, calib: Calibration, block_sizes=(), quiet: bool = False) -> dict:
    """Block influence of every layer, and angular distances for each block size n in `block_sizes`.

    Returns {"block_influence": [L values], "angular_distance": {n: [d(l, l+n) for l in 0..L-n]}}.
    `base_model` may be streamed (streamed_base_model) or a loaded model's base_model.
    """
    import collections

    import torch
    import torch.nn.functional as F

    from ..models import decoder_layers

    layers = decoder_layers(base_model)
    num_layers = len(layers)
    block_sizes = sorted(set(block_sizes))
    bi_sum = [0.0] * num_layers
    ang_sum = {n: [0.0] * (num_layers - n + 1) for n in block_sizes}
    state = {"mask": None, "inputs": collections.deque(maxlen=(max(block_sizes) if block_sizes else 0) + 1)}

    def add_angles(index, h):
        state["inputs"].append(h)
        for n in block_sizes:
            if index - n >= 0 and len(state["inputs"]) > n:
                cos = (state["inputs"][-1 - n] * h).sum(-1).clamp(-1, 1)
                ang_sum[n][index - n] += (torch.arccos(cos) / math.pi).sum().item()

    def on_layer(index, module, args, kwargs, output, bar):
        mask = state["mask"]
        x = F.normalize(_hidden(args[0] if args else kwargs["hidden_states"])[mask].float(), dim=-1)
        y = F.normalize(_hidden(output)[mask].float(), dim=-1)
        bi_sum[index] += (1 - (x * y).sum(-1)).sum().item()
        add_angles(index, x)
        if index == num_layers - 1:
            add_angles(num_layers, y)
        bar.update(1)

    device = next(p.device for p in base_model.parameters() if p.device.type != "meta")
    batches = math.ceil(len(calib.windows) / BATCH_WINDOWS)
    with progress_bar(batches * num_layers, "scoring layers", unit="layer", quiet=quiet) as bar:
        handles = [layer.register_forward_hook(
            lambda m, a, k, o, i=i: on_layer(i, m, a, k, o, bar), with_kwargs=True)
            for i, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                for ids, mask in _batches(calib.windows, device):
                    state["mask"] = mask.bool()
                    state["inputs"].clear()
                    base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
    tokens = calib.num_tokens
    return {"block_influence": [s / tokens for s in bi_sum],
            "angular_distance": {n: [s / tokens for s in sums] for n, sums in ang_sum.items()}}


def greedy_removal(model, calib: Calibration, down_to: int, quiet: bool = False) -> list[dict]:
    """Layers removed one at a time, each the one whose removal raises calibration perplexity least.

    Returns [{"layer": i, "calib_ppl": perplexity after removing it}, ...] until `down_to` are left.
    Ties go to the lower index.
    """
    from ..models import decoder_layers
    from ..quality import perplexity

    num_layers = len(decoder_layers(model))
    kept = list(range(num_layers))
    removable = [i for i in kept if i not in protected_layers(num_layers)]
    forwards = sum(len(removable) - step for step in range(num_layers - down_to))
    order = []
    with progress_bar(forwards, "greedy-ppl", unit="forward", quiet=quiet) as bar:
        while len(kept) > down_to:
            trials = []
            for layer in removable:
                with kept_layers_only(model, [i for i in kept if i != layer]):
                    trials.append((perplexity(model, calib.windows, BATCH_WINDOWS), layer))
                bar.update(1)
            ppl, layer = min(trials)
            kept.remove(layer)
            removable.remove(layer)
            order.append({"layer": layer, "calib_ppl": ppl})
    return order


# ---------------------------------------------------------------- choosing layers

def kept_by_influence(block_influence: list[float], num_kept: int) -> list[int]:
    """First and last layer, then the middle layers of highest block influence (ties: lower index)."""
    num_layers = len(block_influence)
    middle = [i for i in range(num_layers) if i not in protected_layers(num_layers)]
    ranked = sorted(middle, key=lambda i: (-block_influence[i], i))
    return sorted([*protected_layers(num_layers), *ranked[:num_kept - 2]])


def kept_by_angular(distances: list[float], num_layers: int, num_kept: int) -> tuple[list[int], int]:
    """(kept layers, first dropped layer): the block of n = L - K layers whose input and output are
    closest, among blocks that leave the first and last layer in place."""
    n = num_layers - num_kept
    starts = range(1, num_layers - n)                  # block l..l+n-1 within 1..L-2
    start = min(starts, key=lambda l: (distances[l], l))
    return [i for i in range(num_layers) if not start <= i < start + n], start


def kept_by_greedy(order: list[dict], num_layers: int, num_kept: int) -> list[int]:
    removed = {step["layer"] for step in order[:num_layers - num_kept]}
    return [i for i in range(num_layers) if i not in removed]


def _rounded(values):
    return [round(v, 6) for v in values]


def data_plans(strategy: str, num_layers: int, speedups, calib: Calibration, *, shape=None,
               model=None, base_model=None, streamed: bool = False, quiet: bool = False) -> list[LayerPlan]:
    """One plan per speedup for a data strategy. bi/angular need `base_model` (streamed or not);
    greedy-ppl needs the loaded `model`. The scores are computed once for all speedups."""
    if strategy not in DATA_STRATEGIES:
        raise UserError(f"unknown data strategy '{strategy}'; choose one of {', '.join(DATA_STRATEGIES)}")
    kept_counts = [num_kept_for_speedup(num_layers, s) for s in speedups]
    start = time.perf_counter()
    common = {"calibration": calib.describe(), "protected_layers": list(protected_layers(num_layers))}
    plans = []
    if strategy == "greedy-ppl":
        order = greedy_removal(model, calib, min(kept_counts), quiet)
        common.update(removal_order=[{"layer": s["layer"], "calib_ppl": round(s["calib_ppl"], 4)} for s in order],
                      streamed=False)
        picks = [(kept_by_greedy(order, num_layers, k), {}) for k in kept_counts]
    else:
        sizes = [num_layers - k for k in kept_counts] if strategy == "angular" else []
        scores = similarity_scores(base_model, calib, sizes, quiet)
        common["streamed"] = streamed
        if strategy == "bi":
            common["block_influence"] = _rounded(scores["block_influence"])
            picks = [(kept_by_influence(scores["block_influence"], k), {}) for k in kept_counts]
        else:
            picks = []
            for k in kept_counts:
                dist = scores["angular_distance"][num_layers - k]
                kept, first = kept_by_angular(dist, num_layers, k)
                picks.append((kept, {"block_size": num_layers - k, "angular_distance": _rounded(dist),
                                     "dropped_block_start": first}))
    common["seconds"] = round(time.perf_counter() - start, 3)
    for s, (kept, extra) in zip(speedups, picks):
        plans.append(plan_for_kept(num_layers, kept, strategy, s, shape, scores={**common, **extra}))
    return plans


def plan_from_data(model: str | Path, speedup: float, strategy: str, calib_path, *,
                   calib_tokens: int = DEFAULT_CALIB_TOKENS, device: str = "cpu",
                   quiet: bool = False) -> LayerPlan:
    """A plan for `model` at `speedup`, its layers chosen by `strategy` on the --calib text."""
    from ..models import load_causal_lm
    from ..tokenizer import load_tokenizer
    from ..precision import resolve_device
    from ..checkpoint import load_model_info

    if strategy not in DATA_STRATEGIES:
        raise UserError(f"unknown data strategy '{strategy}'; choose one of {', '.join(DATA_STRATEGIES)}")
    if speedup is None:
        raise UserError(f"--strategy {strategy} needs --speedup")
    model_dir, config, adapter = load_model_info(model)
    num_layers = adapter.num_layers(config)
    num_kept_for_speedup(num_layers, speedup)
    calib = read_calibration(load_tokenizer(model_dir), calib_path, calib_tokens)
    device = resolve_device(device)
    kwargs = dict(shape=adapter.shape(config), quiet=quiet)
    if strategy == "greedy-ppl":
        return data_plans(strategy, num_layers, [speedup], calib,
                          model=load_causal_lm(model_dir, "fp32", device), **kwargs)[0]
    with streamed_base_model(model_dir, device) as base:
        streamed = base is not None
        if base is None:
            base = load_causal_lm(model_dir, "fp32", device).base_model
        return data_plans(strategy, num_layers, [speedup], calib, base_model=base,
                          streamed=streamed, **kwargs)[0]


def trained_plan(model: str | Path, speedup) -> LayerPlan | None:
    """The plan a jointly healed model was trained for at `speedup`, or None."""
    from ..artifact import Artifact
    from ..checkpoint import load_model_info

    if speedup is None:
        return None
    model_dir, config, adapter = load_model_info(model)
    for depth in Artifact.open(model_dir).trained_depths:
        if float(depth["speedup"]) == float(speedup):
            return plan_for_kept(adapter.num_layers(config), depth["kept"], depth["strategy"], float(speedup),
                                 adapter.shape(config), scores={"trained_depth": True})
    return None


def depth_plans(model: str | Path, speedups, strategy: str = "uls", calib=None, *,
                calib_tokens: int = DEFAULT_CALIB_TOKENS, device: str = "cpu", quiet: bool = False):
    """(speedup, plan) for each distinct speedup of `speedups`, in order: 1 is the full depth (every layer),
    the others `layer_plan_for_model`'s. What a multi-depth export and joint healing are planned by."""
    import math

    from ..checkpoint import load_model_info

    speedups = sorted({float(s) for s in speedups})
    if not speedups:
        raise UserError("--speedups needs at least one speedup, e.g. 1,2,3")
    if not all(math.isfinite(s) and s >= 1 for s in speedups):
        raise UserError(f"--speedups: each speedup is a number >= 1 (1 is the full model), got {speedups}")
    _, config, adapter = load_model_info(model)
    num_layers = adapter.num_layers(config)
    return [(s, plan_for_kept(num_layers, list(range(num_layers)), "full", 1.0, adapter.shape(config)) if s == 1
             else layer_plan_for_model(model, s, strategy, calib=calib, calib_tokens=calib_tokens, device=device,
                                       quiet=quiet)) for s in speedups]


@dataclass(frozen=True)
class PlanSettings:
    """Which layers to keep: the plan stage's settings, declared once (the CLI's plan options of `plan` and
    `prune`, and a recipe's `plan:` section, build it)."""
    strategy: str = "uls"
    speedup: float | None = None
    keep: Sequence[int] | None = None       # explicit layers to keep (instead of a strategy)
    skip: Sequence[int] | None = None       # explicit layers to remove
    calib: Path | None = None               # calibration text of bi, angular, greedy-ppl
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    device: str = "cpu"                     # where calibration scoring runs

    def plan(self, model, quiet: bool = False) -> LayerPlan:
        """The plan for `model` (`layer_plan_for_model`)."""
        return layer_plan_for_model(model, self.speedup, self.strategy,
                                    list(self.keep) if self.keep is not None else None,
                                    list(self.skip) if self.skip is not None else None, self.calib,
                                    calib_tokens=self.calib_tokens, device=self.device, quiet=quiet)


def layer_plan_for_model(model: str | Path, speedup=None, strategy: str = "uls", keep=None, skip=None,
                         calib=None, *, calib_tokens: int = DEFAULT_CALIB_TOKENS, device: str = "cpu",
                         quiet: bool = False) -> LayerPlan:
    """prune.plan_for_model for every strategy: explicit lists and positional rules need no data;
    bi, angular and greedy-ppl need the --calib text. A model healed jointly for several depths
    (`heal --speedups`) gives the plan it was trained for at that speedup."""
    from ..prune import plan_for_model

    strategy = strategy_name(strategy)
    trained = trained_plan(model, speedup) if keep is None and skip is None else None
    if trained is not None:
        return trained
    if strategy in DATA_STRATEGIES and keep is None and skip is None:
        return plan_from_data(model, speedup, strategy, calib, calib_tokens=calib_tokens,
                              device=device, quiet=quiet)
    if calib is not None:
        raise UserError(f"--calib is used only by --strategy {'|'.join(DATA_STRATEGIES)}")
    return plan_for_model(model, speedup, strategy, keep, skip)
