"""Recipes: the whole pipeline (plan -> prune -> onnx -> validate) from one plain YAML file.

A recipe names a model, a plan and, optionally, an ONNX export and a validation; `run_recipe` writes
everything under `artifacts/<name>/`: `hf/`, `onnx/`, `report/` (report.md, report.json, report.png).
A stage whose inputs (its recipe section and the stage before it) have not changed since the last run
is skipped, and says so; `force=True` redoes every stage. `--set key=value` overrides any field,
dotted for nested ones (`--set plan.speedup=3`).
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from .errors import UserError
from .plan.scoring import DEFAULT_CALIB_TOKENS
from .validate.speed import SpeedSettings

REQUIRED = object()
# Every field a recipe may hold: section -> field -> (type, default); "" is the top level.
SCHEMA: dict[str, dict[str, tuple[type | tuple, object]]] = {
    "": {"name": (str, REQUIRED), "model": (str, REQUIRED), "artifacts": (str, "artifacts")},
    "plan": {"strategy": (str, "uls"), "speedup": ((int, float), None), "keep": (list, None), "skip": (list, None),
             "calib": (str, None), "calib_tokens": (int, DEFAULT_CALIB_TOKENS), "device": (str, "cpu")},
    "onnx": {"builder": (str, "torch"), "dtype": (str, "fp32"), "device": (str, "cpu")},
    "validate": {"runtime": (str, None), "device": (str, "cpu"), "batches": (list, list(SpeedSettings.batches)),
                 "prompt_len": (int, SpeedSettings.prompt_len), "new_tokens": (int, SpeedSettings.new_tokens),
                 "runs": (int, SpeedSettings.runs), "parity_steps": (int, 32), "text": (str, None)},
}
STAMPS = ".ulsexport-stages.json"


@dataclass(frozen=True)
class RecipeRun:
    out_dir: Path
    stages: dict[str, str]   # stage -> "ran" or "skipped (unchanged)"
    report: dict | None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> dict:
    """The recipe at `path` with `key=value` overrides applied, every field checked, defaults filled in."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping of fields (name, model, plan, ...)")
    lines = _key_lines(text)
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
        target[field] = yaml.safe_load(value)
        lines[key] = "--set"
    return _checked(data, path, lines)


def _key_lines(text: str) -> dict[str, int]:
    """'plan.speedup' -> its line in the file, for error messages."""
    out = {}
    root = yaml.compose(text)
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            out[key.value] = key.start_mark.line + 1
            if isinstance(value, yaml.MappingNode):
                for sub, _ in value.value:
                    out[f"{key.value}.{sub.value}"] = sub.start_mark.line + 1
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
    out.setdefault("plan", _fields("plan", {}, where))
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
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise UserError(f"{where(key)}: '{key}' must be {_kind_name(kind)}, not {value!r}")
        out[field] = value
    for field, (_, default) in SCHEMA[section].items():
        key = f"{section}.{field}" if section else field
        if field not in out:
            if default is REQUIRED:
                raise UserError(f"{where(key)}: the recipe needs '{key}'")
            out[field] = copy.copy(default)
    return out


def _kind_name(kind) -> str:
    names = {str: "text", int: "a whole number", list: "a list", (int, float): "a number"}
    return names.get(kind, str(kind))


def run_recipe(recipe: dict, force: bool = False, quiet: bool = False,
               echo: Callable[[str], None] = print) -> RecipeRun:
    """prune -> onnx -> validate as the recipe says, each stage skipped when its inputs are unchanged."""
    from .plan.scoring import layer_plan_for_model

    out = Path(recipe["artifacts"]) / recipe["name"]
    stamps_path = out / STAMPS
    stamps = json.loads(stamps_path.read_text()) if stamps_path.is_file() and not force else {}
    stages: dict[str, str] = {}
    report = None

    def stage(name: str, inputs: dict, target: Path, work: Callable[[], None]) -> str:
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
        if stamps.get(name) == key and target.exists():
            stages[name] = "skipped (unchanged)"
        else:
            echo(f"[{recipe['name']}] {name} ...")
            work()
            stamps[name] = key
            out.mkdir(parents=True, exist_ok=True)
            stamps_path.write_text(json.dumps(stamps, indent=2) + "\n")
            stages[name] = "ran"
        echo(f"[{recipe['name']}] {name}: {stages[name]}")
        return key

    plan_section = recipe["plan"]
    prune_key = stage("prune", {"model": recipe["model"], "plan": plan_section}, out / "hf",
                      lambda: _prune(recipe, out / "hf", quiet, layer_plan_for_model))
    onnx_key = prune_key
    if recipe.get("onnx"):
        onnx_key = stage("onnx", {"after": prune_key, **recipe["onnx"]}, out / "onnx",
                         lambda: _onnx(recipe["onnx"], out, quiet))
    if recipe.get("validate"):
        holder: dict = {}
        stage("validate", {"after": onnx_key, **recipe["validate"]}, out / "report" / "report.json",
              lambda: holder.update(report=_validate(recipe, out, quiet)))
        report = holder.get("report") or json.loads((out / "report" / "report.json").read_text())
    return RecipeRun(out, stages, report)


def _prune(recipe: dict, target: Path, quiet: bool, layer_plan_for_model) -> None:
    from .prune import prune_checkpoint

    p = recipe["plan"]
    plan = layer_plan_for_model(recipe["model"], p["speedup"], p["strategy"], p["keep"], p["skip"], p["calib"],
                                calib_tokens=p["calib_tokens"], device=p["device"], quiet=quiet)
    prune_checkpoint(recipe["model"], target, plan, force=True, quiet=quiet)


def _onnx(section: dict, out: Path, quiet: bool) -> None:
    from .export import get_builder

    get_builder(section["builder"]).build(out / "hf", out / "onnx", section["dtype"], section["device"],
                                          force=True, quiet=quiet)


def _validate(recipe: dict, out: Path, quiet: bool) -> dict:
    from .validate.report import write_reports
    from .validate import validate

    v = recipe["validate"]
    candidate = out / ("onnx" if recipe.get("onnx") else "hf")
    speed = SpeedSettings(tuple(v["batches"]), v["prompt_len"], v["new_tokens"], v["runs"], 1)
    report = validate(recipe["model"], candidate, v["runtime"], v["device"], None, speed, v["parity_steps"],
                      text=v["text"], quiet=quiet)
    (out / "report").mkdir(parents=True, exist_ok=True)
    write_reports(report, out / "report" / "report.json", out / "report" / "report.md", out / "report" / "report.png")
    return report
