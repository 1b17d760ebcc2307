"""Recipes: the whole pipeline (plan -> prune -> heal -> onnx -> validate -> triton) from one plain YAML file.

A recipe names a model, a plan and, optionally, healing, an ONNX export, a validation and a Triton model
repository; `run_recipe` writes everything under `artifacts/<name>/`: `hf/`, `healed/`, `onnx/`, `report/`
(report.md, report.json, report.png), `triton/`, and returns a short summary of what the run measured.
A stage whose inputs (its recipe section and the stage before it) have not changed since the last run,
and whose outputs are still those it wrote (their contents fingerprinted when written), is skipped, and
says so; `force=True` redoes every stage. `--set key=value` overrides any field,
dotted for nested ones (`--set plan.speedup=3`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from .errors import UserError
from .export import BUILDERS
from .export.stage import OnnxSettings
from .heal.train import LOSSES, MAX_LR, TRAIN_DTYPES, HealSettings
from .plan.compare import STRATEGIES
from .plan.scoring import PlanSettings
from .runtime import RUNTIMES
from .serve.repository import MAX_BATCH, MAX_INSTANCES, MAX_QUEUE_DELAY_US, MAX_TOKENS_LIMIT
from .serve.repository import RECIPE_FIELDS as TRITON_FIELDS
from .validate.stage import ValidateSettings

REQUIRED = object()


class IntList:
    """A schema type: a list whose items are whole numbers (not bools, floats or text), each at
    least `minimum`."""

    def __init__(self, what: str, minimum: int = 0):
        self.what, self.minimum = what, minimum


LAYERS = IntList("layer indices")
# Every field a recipe may hold: section -> field -> (type, default); "" is the top level.
SCHEMA: dict[str, dict[str, tuple[type | tuple, object]]] = {
    "": {"name": (str, REQUIRED), "model": (str, REQUIRED), "artifacts": (str, "artifacts")},
    # plan: PlanSettings' fields (their defaults)
    "plan": {f: (t, getattr(PlanSettings, f)) for f, t in [
        ("strategy", str), ("speedup", (int, float)), ("keep", LAYERS), ("skip", LAYERS), ("calib", str),
        ("calib_tokens", int), ("device", str)]},
    # heal: HealSettings' fields (their defaults) but joint healing's, plus the texts
    "heal": {"data": ((str, list), REQUIRED), "eval_text": ((str, list), None),
             **{f: (t, getattr(HealSettings, f)) for f, t in [
                 ("data_weights", list), ("teacher_samples", int), ("teacher_weight", (int, float)),
                 ("sample_temperature", (int, float)),
                 ("hidden_weight", (int, float)), ("loss", str), ("kd_weight", (int, float)),
                 ("temperature", (int, float)), ("steps", int), ("warmup_steps", int), ("batch", int),
                 ("seq_len", int), ("lr", (int, float)), ("lora_rank", int), ("device", str), ("dtype", str),
                 ("eval_tokens", int), ("eval_samples", int), ("save_every", int), ("seed", int)]}},
    # onnx: OnnxSettings' fields (their defaults) but multi-depth's and allow_pickle
    "onnx": {f: (t, getattr(OnnxSettings, f)) for f, t in [
        ("builder", str), ("dtype", str), ("device", str), ("opset", int), ("no_optimize", bool), ("attention", str),
        ("kv_cache", str), ("target", str)]},
    # validate: ValidateSettings' fields (their defaults) but the multi-depth ones; the runtime follows the builder
    "validate": {"runtime": (str, None), "batches": (IntList("batch sizes", 1), list(ValidateSettings.batches)),
                 "text": ((str, list), None), "tasks": (str, None), "tolerance": ((int, float), None),
                 **{f: (t, getattr(ValidateSettings, f)) for f, t in [
                     ("device", str), ("dtype", str), ("prompt_len", int), ("new_tokens", int), ("runs", int),
                     ("warmup", int), ("no_speed", bool), ("parity_steps", int), ("eval_samples", int),
                     ("no_cuda_graph", bool), ("decode_kernels", bool)]}},
    "triton": TRITON_FIELDS,
}
STAMPS = ".ulsexport-stages.json"


def _between(low, high=None, above: bool = False):
    """(test, words) of a number from `low` (excluded when `above`) to `high`, finite."""
    def test(v):
        return math.isfinite(v) and (v > low if above else v >= low) and (high is None or v <= high)
    words = f"above {low:g}" if above else f"at least {low:g}"
    words += f" and at most {high:g}" if high is not None else ""
    return test, words


def _one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(choices)


PATHS = ((lambda v: isinstance(v, str) or bool(v) and all(isinstance(p, str) for p in v)),
         "a file path or a list of them")
DEVICE = (lambda v: re.fullmatch(r"cpu|cuda(:\d+)?", v) is not None), "cpu, cuda or cuda:N"
# What a field's value may be beyond its type, checked when the recipe is read: key -> (test, words).
ALLOWED = {
    "plan.strategy": _one_of(*STRATEGIES), "plan.speedup": _between(1, above=True), "plan.calib_tokens": _between(1),
    "plan.device": DEVICE,
    "heal.loss": _one_of(*LOSSES), "heal.steps": _between(1), "heal.batch": _between(1), "heal.seq_len": _between(2),
    "heal.lr": _between(0, MAX_LR, above=True), "heal.device": DEVICE, "heal.dtype": _one_of(*TRAIN_DTYPES),
    "heal.seed": _between(0, 2**32 - 1), "heal.data": PATHS, "heal.eval_text": PATHS, "validate.text": PATHS,
    "heal.data_weights": ((lambda v: all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                                         and w >= 0 for w in v) and sum(v) > 0), "a list of non-negative numbers"),
    "heal.teacher_samples": _between(0, 10_000_000), "heal.teacher_weight": _between(0, 0.999), "heal.hidden_weight": _between(0, 100),
    "heal.lora_rank": _between(1, 4096), "heal.eval_tokens": _between(2, 100_000_000),
    "heal.kd_weight": _between(0, 1), "heal.temperature": _between(0, above=True), "heal.warmup_steps": _between(0),
    "heal.save_every": _between(1), "heal.sample_temperature": _between(0, 10, above=True),
    "heal.eval_samples": _between(0, 100_000),
    "onnx.builder": _one_of(*BUILDERS), "onnx.dtype": _one_of(*dict.fromkeys(d for b in BUILDERS.values()
                                                                            for d in b.dtypes)),
    "onnx.device": DEVICE, "onnx.opset": _between(7, 30), "onnx.attention": _one_of("gqa", "mha"),
    "onnx.kv_cache": _one_of("shared", "concat"), "onnx.target": _one_of("ort", "tensorrt"),
    "validate.runtime": _one_of(*RUNTIMES), "validate.device": DEVICE, "validate.prompt_len": _between(1, 2**20),
    "validate.new_tokens": _between(2, 2**20), "validate.runs": _between(1, 10_000),
    "validate.parity_steps": _between(1, 2**20), "validate.warmup": _between(0, 10_000),
    "validate.eval_samples": _between(0, 100_000), "validate.tolerance": _between(0, above=True),
    "validate.dtype": _one_of("fp32", "fp16", "bf16"),
    "triton.name": ((lambda v: re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", v) is not None),
                    "letters, digits, '_', '-' and '.', not starting with '.' or '-' (it becomes a URL path)"),
    "triton.device": _one_of("cpu", "cuda"), "triton.runtime": _one_of(*RUNTIMES),
    "triton.instances": _between(1, MAX_INSTANCES), "triton.max_batch": _between(1, MAX_BATCH),
    "triton.max_tokens": _between(1, MAX_TOKENS_LIMIT), "triton.default_max_tokens": _between(1, MAX_TOKENS_LIMIT),
    "triton.queue_delay_us": _between(0, MAX_QUEUE_DELAY_US), "triton.batching": _one_of("auto", "continuous", "static"),
    "triton.draft_tokens": _between(1, 16),
}
# Files hashed whole when a stage decides whether its model changed; larger ones by size, time and header.
HASH_WHOLE_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class RecipeRun:
    out_dir: Path
    stages: dict[str, str]   # stage -> "ran" or "skipped (unchanged)"
    report: dict | None
    summary: list[str]       # what the run measured, a line each


def load_recipe(path: str | Path, overrides: list[str] = ()) -> dict:
    """The recipe at `path` with `key=value` overrides applied, every field checked, defaults filled in."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    except OSError as exc:
        raise UserError(f"could not read recipe {path}: {exc.strerror or type(exc).__name__}") from None
    data = _safe_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping of fields (name, model, plan, ...)")
    lines = _key_lines(text, str(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"{path}: --set {item}: expected key=value, e.g. plan.speedup=3")
        section, _, field = key.rpartition(".")
        target = data
        if section:
            if not isinstance(data.get(section), dict):
                data[section] = {}
            target = data[section]
        target[field] = _safe_yaml(value, f"{path} (--set {key})")
        lines[key] = "--set"
    return _checked(data, path, lines)


def _safe_yaml(text: str, where: str):
    """yaml.safe_load, with anchors and aliases refused before any value is built: an alias
    repeats a value, and a few nested ones expand a 400-byte file into gigabytes."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                line = event.start_mark.line + 1
                raise UserError(f"{where} line {line}: YAML anchors and aliases (&name, *name) are not "
                                "allowed in recipes; write the value out")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: not valid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise UserError(f"{where}: nested too deeply to be a recipe") from None


def _key_lines(text: str, where: str) -> dict[str, int]:
    """'plan.speedup' -> its line in the file, for error messages; a field given twice is refused (YAML
    would keep the last one without a word)."""
    out: dict[str, int] = {}

    def add(key: str, node) -> None:
        line = node.start_mark.line + 1
        if key in out:
            raise UserError(f"{where} line {line}: '{key}' is given twice (line {out[key]} too); keep one")
        out[key] = line

    root = yaml.compose(text)
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            add(str(key.value), key)
            if isinstance(value, yaml.MappingNode):
                for sub, _ in value.value:
                    add(f"{key.value}.{sub.value}", sub)
    return out


def _checked(data: dict, path: Path, lines: dict) -> dict:
    def where(key):
        line = lines.get(key)
        return f"{path}" + (f" line {line}" if isinstance(line, int) else f" ({line})" if line else "")

    sections = [name for name in SCHEMA if name]
    out: dict = {}
    for key, value in data.items():
        if key in sections:
            value = {} if value is None else value  # a section named with no fields takes every default
            if not isinstance(value, dict):
                raise UserError(f"{where(key)}: '{key}' must be a mapping of fields ({', '.join(SCHEMA[key])})")
            out[key] = _fields(key, value, where)
        elif key not in SCHEMA[""]:
            raise UserError(f"{where(key)}: unknown field '{key}' (known: {', '.join([*SCHEMA[''], *sections])})")
    out.update(_fields("", {k: v for k, v in data.items() if k in SCHEMA[""]}, where))
    _check_name(out["name"], where)
    out.setdefault("plan", _fields("plan", {}, where))
    given = data.get("plan") if isinstance(data.get("plan"), dict) else {}
    for listed in ("keep", "skip"):
        if out["plan"][listed] is not None:
            for other in ("speedup", "strategy"):
                if given.get(other) is not None:
                    raise UserError(f"{where('plan.' + listed)}: 'plan.{listed}' gives the layers explicitly; "
                                    f"drop 'plan.{other}' (or 'plan.{listed}')")
    if "onnx" in out and out["onnx"]["dtype"] not in BUILDERS[out["onnx"]["builder"]].dtypes:
        raise UserError(f"{where('onnx.dtype')}: the {out['onnx']['builder']} builder exports "
                        f"{', '.join(BUILDERS[out['onnx']['builder']].dtypes)}, not {out['onnx']['dtype']}")
    if "validate" in out and out["validate"]["runtime"] is None:
        from .export import get_builder

        builder = out.get("onnx", {}).get("builder")
        out["validate"]["runtime"] = get_builder(builder).runtime if builder else "torch"
    return out


def _fields(section: str, values: dict, where: Callable[[str], str]) -> dict:
    out = {}
    for field, value in values.items():
        key = f"{section}.{field}" if section else field
        if field not in SCHEMA[section]:
            raise UserError(f"{where(key)}: unknown field '{key}' (known: {', '.join(SCHEMA[section])})")
        kind = SCHEMA[section][field][0]
        if isinstance(kind, IntList):
            if value is not None:
                _check_int_list(key, value, kind, where)
        elif value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
            raise UserError(f"{where(key)}: '{key}' must be {_kind_name(kind)}, not {_brief(value)}")
        if key in ALLOWED and value is not None and not ALLOWED[key][0](value):
            raise UserError(f"{where(key)}: '{key}' must be {ALLOWED[key][1]}, not {_brief(value)}")
        out[field] = value
    for field, (_, default) in SCHEMA[section].items():
        key = f"{section}.{field}" if section else field
        if field not in out:
            if default is REQUIRED:
                raise UserError(f"{where(key)}: the recipe needs '{key}'")
            out[field] = copy.copy(default)
    return out


def _check_int_list(key: str, value, kind: IntList, where) -> None:
    if not isinstance(value, list):
        raise UserError(f"{where(key)}: '{key}' must be a list of {kind.what} (whole numbers), not {_brief(value)}")
    for position, item in enumerate(value, 1):
        if isinstance(item, bool) or not isinstance(item, int):
            raise UserError(f"{where(key)}: '{key}' holds {kind.what}, which are whole numbers; item {position} "
                            f"is {_brief(item)}")
        if item < kind.minimum:
            raise UserError(f"{where(key)}: '{key}' item {position} is {item}; {kind.what} are at least "
                            f"{kind.minimum}")


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _check_name(name: str, where) -> None:
    """A recipe's name is one plain folder name under artifacts/: no path, no '..'."""
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name
           or os.path.isabs(name) or len(name.encode()) > 200)
    if bad:
        raise UserError(f"{where('name')}: 'name' must be a plain folder name (no '/', not '..', at most "
                        f"200 bytes), not {_brief(name)}")


def _kind_name(kind) -> str:
    names = {str: "text", int: "a whole number", bool: "true or false", list: "a list", (int, float): "a number",
             (str, list): "a path or a list of paths"}
    return names.get(kind, str(kind))


def run_recipe(recipe: dict, force: bool = False, quiet: bool = False,
               echo: Callable[[str], None] = print) -> RecipeRun:
    """prune -> onnx -> validate as the recipe says, each stage skipped when its inputs are unchanged."""
    from .outputs import resolve_path
    from .validate import check_device

    _check_name(recipe["name"], lambda key: "recipe")
    artifacts = Path(recipe["artifacts"])
    out = artifacts / recipe["name"]
    if resolve_path(out).parent != resolve_path(artifacts):
        raise UserError(f"recipe name {recipe['name']!r} would write outside {artifacts}")
    for section in ("plan", "heal", "onnx", "validate"):  # a device this machine lacks, before any stage runs
        if (recipe.get(section) or {}).get("device"):
            check_device(recipe[section]["device"], f"the recipe's '{section}.device'")
    for key in ("plan.calib", "heal.data", "heal.eval_text", "validate.text"):  # and text files that are not there
        section, field = key.split(".")
        paths = (recipe.get(section) or {}).get(field)
        for path in [paths] if isinstance(paths, str) else paths or []:
            if not Path(path).exists():
                raise UserError(f"the recipe's '{key}' {path} does not exist")
    stamps_path = out / STAMPS
    stamps = _read_stamps(stamps_path) if not force else {}
    stages: dict[str, str] = {}
    report = None

    def stage(name: str, inputs: dict, target: Path, work: Callable[[], None]) -> str:
        """Run `work` unless the stage's inputs and its outputs (`target`, as fingerprinted when it was
        written) are both unchanged; returns what later stages are keyed by: inputs and outputs."""
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
        written = target.parent if target.name == "report.json" else target  # the whole report folder
        recorded = stamps.get(name) if isinstance(stamps.get(name), dict) else {}
        outputs = model_fingerprint(str(written)) if recorded.get("inputs") == key and target.exists() else None
        if outputs is not None and recorded.get("outputs") == outputs:
            stages[name] = "skipped (unchanged)"
        else:
            if target.name != "report.json" and os.path.lexists(target) and not (target / "ulsexport.json").is_file():
                raise UserError(f"{target} exists and was not written by ulsexport (no ulsexport.json); "
                                "`run` replaces only its own outputs: move it away")
            echo(f"[{recipe['name']}] {name} ...")
            changed = outputs is not None  # the same inputs, but the outputs are not those written
            work()
            outputs = model_fingerprint(str(written))
            stamps[name] = {"inputs": key, "outputs": outputs}
            out.mkdir(parents=True, exist_ok=True)
            _write_stamps(stamps_path, stamps)
            stages[name] = "ran (its outputs had changed since it wrote them)" if changed else "ran"
        echo(f"[{recipe['name']}] {name}: {stages[name]}")
        return f"{key}:{outputs}"

    plan_section = recipe["plan"]
    plan = _plan_up_front(recipe, quiet)  # a bad plan is refused before any stage starts
    prune_key = stage("prune", {"model": recipe["model"], "model_contents": model_fingerprint(recipe["model"]),
                                "plan": plan_section}, out / "hf",
                      lambda: _prune(recipe, out / "hf", quiet, plan))
    checkpoint, checkpoint_key = out / "hf", prune_key
    if recipe.get("heal"):
        section = recipe["heal"]
        data = [section["data"]] if isinstance(section["data"], str) else section["data"]
        checkpoint_key = stage("heal", {"after": prune_key, **section,
                                        "data_contents": [model_fingerprint(d) for d in data]},
                               out / "healed", lambda: _heal(recipe, out, quiet))
        checkpoint = out / "healed"
    onnx_key = checkpoint_key
    if recipe.get("onnx"):
        onnx_key = stage("onnx", {"after": checkpoint_key, **recipe["onnx"]}, out / "onnx",
                         lambda: _onnx(recipe["onnx"], checkpoint, out, quiet))
    if recipe.get("validate"):
        holder: dict = {}
        candidate = out / "onnx" if recipe.get("onnx") else checkpoint
        stage("validate", {"after": onnx_key, **recipe["validate"]}, out / "report" / "report.json",
              lambda: holder.update(report=_validate(recipe, candidate, out, quiet)))
        report = holder.get("report") or json.loads((out / "report" / "report.json").read_text())
    if recipe.get("triton") is not None:
        from .serve.repository import recipe_stage

        stage("triton", {"after": onnx_key, **recipe["triton"]}, out / "triton",
              lambda: recipe_stage(recipe["triton"], out, quiet))
    return RecipeRun(out, stages, report, summary(recipe, out, report))


def summary(recipe: dict, out: Path, report: dict | None) -> list[str]:
    """A few lines of what the run measured: layers kept, parity, decode speedup, perplexities."""
    from .artifact import Artifact

    pruned = Artifact.open(out / "hf").manifest
    kept, total = pruned.get("kept") or [], pruned.get("num_layers_original")
    lines = [f"{recipe['name']}: {len(kept)} of {total} layers kept ({(pruned.get('plan') or {}).get('strategy')} "
             f"plan: {','.join(map(str, kept))})"]
    if report is not None:
        parity = report["parity"]
        lines.append(f"parity: {'PASS' if parity['passed'] else 'FAIL'} against the PyTorch checkpoint (max relative "
                     f"logit error {parity['max_relative_error']:.1e}, greedy tokens "
                     f"{'identical' if parity['greedy_tokens_equal'] else 'differ'} over {parity['steps_compared']} "
                     f"steps; {report['runtime']} on {report['device']})")
        for batch, measured in ((report.get("speedup") or {}).get("measured") or {}).items():
            speeds = report["speed"]
            lines.append(f"decode speed, batch {batch}: {measured['decode_tokens_per_s']:.2f}x the full model "
                         f"({speeds['full'][batch]['decode_tokens_per_s']['median']:.0f} -> "
                         f"{speeds['pruned'][batch]['decode_tokens_per_s']['median']:.0f} tokens/s, {report['runtime']})")
    healing = Artifact.open(out / "healed").healing if recipe.get("heal") else None
    if healing and healing.get("perplexity_after") is not None and healing.get("teacher_perplexity"):
        lines.append(f"perplexity on {Path(healing['eval_text']).name}: full {healing['teacher_perplexity']:.2f}, "
                     f"pruned {healing['perplexity_before']:.2f}, healed {healing['perplexity_after']:.2f} "
                     f"({healing['perplexity_after'] / healing['teacher_perplexity']:.3f}x the full model)")
        if healing.get("quality_teacher"):
            from .heal.train import quality_rows
            from .quality import generality_table

            lines.extend(generality_table(quality_rows(healing)).splitlines())
    elif report is not None and report.get("perplexity"):
        p = report["perplexity"]
        lines.append(f"perplexity on {Path(p['text']).name}: full {p['full']:.2f}, pruned {p['pruned']:.2f}")
    return lines


def _read_stamps(path: Path) -> dict:
    try:
        stamps = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}  # unreadable: every stage runs again
    return stamps if isinstance(stamps, dict) else {}


def _write_stamps(path: Path, stamps: dict) -> None:
    """The stamps file, whole or not at all (a partial one would make every stage look changed, or worse)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stamps, indent=2) + "\n")
    os.replace(tmp, path)


def model_fingerprint(model: str) -> str | None:
    """What a stage's reuse is keyed by: the contents of the model directory (or of a data file or
    folder), not its path. Files up to
    HASH_WHOLE_BYTES are hashed whole; larger ones (weights) by size, modification time and their
    first megabyte (a safetensors header). None for a hub id (its revision is what the hub serves)."""
    root = Path(model).expanduser()
    if not root.exists():
        return None
    digest = hashlib.sha256()
    try:
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(root).as_posix() if path != root else root.name}\0{stat.st_size}\0".encode())
            with open(path, "rb") as f:
                if stat.st_size <= HASH_WHOLE_BYTES:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                else:
                    digest.update(f"{stat.st_mtime_ns}\0".encode())
                    digest.update(f.read(1 << 20))
    except OSError as exc:
        raise UserError(f"could not read the model {model}: {exc.strerror or type(exc).__name__} "
                        f"({exc.filename})") from None
    return digest.hexdigest()


def _plan_up_front(recipe: dict, quiet: bool):
    """The recipe's plan where making it is cheap (positional and explicit plans read only the
    config); None for plans scored from calibration data, made when the prune stage runs."""
    from .plan.scoring import DATA_STRATEGIES

    p = recipe["plan"]
    if p["strategy"] in DATA_STRATEGIES and p["keep"] is None and p["skip"] is None:
        return None
    return PlanSettings(**p).plan(recipe["model"], quiet=quiet)


def _prune(recipe: dict, target: Path, quiet: bool, plan=None) -> None:
    from .prune import prune_checkpoint

    plan = plan or PlanSettings(**recipe["plan"]).plan(recipe["model"], quiet=quiet)
    prune_checkpoint(recipe["model"], target, plan, force=True, quiet=quiet)


def _heal(recipe: dict, out: Path, quiet: bool) -> None:
    from .heal import heal

    section = recipe["heal"]
    settings = HealSettings(**{k: v for k, v in section.items() if k not in ("data", "eval_text")})
    heal(recipe["model"], out / "hf", section["data"], out / "healed", settings, eval_text=section["eval_text"],
         quiet=quiet, force=True)


def _onnx(section: dict, checkpoint: Path, out: Path, quiet: bool) -> None:
    from .export.stage import export

    export(checkpoint, out / "onnx", OnnxSettings(**section), force=True, quiet=quiet)


def _validate(recipe: dict, candidate: Path, out: Path, quiet: bool) -> dict:
    from .validate.report import write_reports

    v = recipe["validate"]
    texts = [v["text"]] if isinstance(v["text"], str) else v["text"]
    settings = ValidateSettings(**{**v, "batches": tuple(v["batches"]), "text": tuple(texts) if texts else None})
    report = settings.run(recipe["model"], candidate, quiet=quiet)
    (out / "report").mkdir(parents=True, exist_ok=True)
    write_reports(report, out / "report" / "report.json", out / "report" / "report.md", out / "report" / "report.png")
    return report
