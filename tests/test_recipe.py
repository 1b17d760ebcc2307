"""Recipes: plain YAML in, the whole pipeline out under artifacts/<name>/; unchanged stages are skipped."""
import json
from pathlib import Path

import pytest

from conftest import run_cli
from ulsexport.errors import UserError
from ulsexport.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes" / "stories260k-demo.yaml"


def test_every_shipped_recipe_loads():
    from ulsexport.plan.compare import STRATEGIES

    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe["name"] and recipe["plan"]["strategy"] in STRATEGIES and recipe["plan"]["speedup"] > 1


def test_heal_stage_and_the_summary(tmp_path):
    """prune -> heal -> onnx -> validate, ending with the summary's lines, each from the run."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: healed
model: {ROOT / 'tests/fixtures/models/stories260K'}
artifacts: {tmp_path / 'artifacts'}
plan: {{strategy: uls, speedup: 2}}
heal: {{data: {ROOT / 'tests/fixtures/data/tinystories-valid-excerpt.txt'}, steps: 2, batch: 2, seq_len: 32,
        device: cpu, eval_text: {ROOT / 'tests/fixtures/data/tinystories-valid-excerpt.txt'}, eval_tokens: 4000,
        eval_samples: 4, warmup_steps: 1, temperature: 2.0}}
onnx: {{builder: torch, kv_cache: concat}}
validate: {{runtime: ort, batches: [1], prompt_len: 8, new_tokens: 4, runs: 1, warmup: 0, parity_steps: 4}}
triton: {{max_batch: 2}}
""")
    result = run_cli("run", recipe)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("healed: 2 of 5 layers kept (uls plan: 0,4)")
    assert lines[1].startswith("parity: PASS") and lines[2].startswith("decode speed, batch 1: ")
    assert lines[3].startswith("perplexity on tinystories-valid-excerpt.txt: full ") and "healed " in lines[3]
    out = tmp_path / "artifacts" / "healed"
    manifest = json.loads((out / "onnx" / "ulsexport.json").read_text())
    assert manifest["source"] == str((out / "healed").resolve()) or manifest["source"].endswith("healed")
    healing = json.loads((out / "healed" / "ulsexport.json").read_text())["healing"]
    assert (healing["steps"], healing["warmup_steps"], healing["temperature"]) == (2, 1, 2.0)   # every heal setting
    assert manifest["onnx"]["kv_cache"] == "concat"   # and every onnx setting reach their stage
    assert f"serve it: ulsexport serve {out / 'triton'}" in result.stdout   # what to run next


def test_defaults_and_overrides():
    recipe = load_recipe(DEMO, ["plan.speedup=3", "model=/elsewhere", "validate.batches=[2]"])
    assert recipe["plan"]["speedup"] == 3 and recipe["model"] == "/elsewhere"
    assert recipe["validate"]["batches"] == [2] and recipe["validate"]["runs"] == 3
    assert recipe["artifacts"] == "artifacts" and recipe["plan"]["keep"] is None


def test_runtime_follows_the_builder_when_unset(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmodel: m\nonnx:\n  builder: genai\nvalidate:\n")
    assert load_recipe(path)["validate"]["runtime"] == "genai"
    path.write_text("name: x\nmodel: m\nvalidate:\n")
    assert load_recipe(path)["validate"]["runtime"] == "torch"


@pytest.mark.parametrize("text,overrides,message", [
    ("name: x\nmodel: m\nplan:\n  speedup: 2\n  stratgy: uls\n", [], "line 5: unknown field 'plan.stratgy'"),
    ("name: x\nmodel: m\nexport:\n  dtype: fp16\n", [], "line 3: unknown field 'export'"),
    ("name: x\nmodel: m\nplan:\n  speedup: fast\n", [], "line 4: 'plan.speedup' must be a number"),
    ("name: x\nplan:\n  speedup: 2\n", [], "needs 'model'"),
    ("name: x\nmodel: m\nplan: [1, 2]\n", [], "line 3: 'plan' must be a mapping"),
    ("name: x\nmodel: m\nonnx:\n  no_optimize: 1\n", [], "line 4: 'onnx.no_optimize' must be true or false"),
    ("name: x\nmodel: m\nheal:\n  data: d\n  steps: true\n", [], "line 5: 'heal.steps' must be a whole number"),
    ("name: [x\n", [], "not valid YAML"),
    ("name: x\nmodel: m\n", ["plan.speedup"], "expected key=value"),
    ("name: x\nmodel: m\n", ["plan.speed=2"], "(--set): unknown field 'plan.speed'"),
])
def test_malformed_recipes_name_the_field_and_line(tmp_path, text, overrides, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as error:
        load_recipe(path, overrides)
    assert message in str(error.value) and str(path) in str(error.value)


def test_cli_runs_the_pipeline_then_skips_unchanged_stages(tmp_path):
    fast = ["--set", f"artifacts={tmp_path}", "--set", "validate.batches=[1]", "--set", "validate.prompt_len=8",
            "--set", "validate.new_tokens=4", "--set", "validate.runs=1", "--set", "validate.parity_steps=8"]
    first = run_cli("run", DEMO, *fast)
    assert first.exit_code == 0, first.output
    out = tmp_path / "stories260k-uls-2x"
    assert (out / "hf" / "config.json").is_file() and (out / "onnx" / "model.onnx").is_file()
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["parity"]["passed"] and report["kept"] == [0, 4] and "perplexity" in report
    assert (out / "report" / "report.md").is_file() and (out / "report" / "report.png").is_file()
    assert "prune: ran" in first.stderr and "validate: ran" in first.stderr

    again = run_cli("run", DEMO, *fast)
    assert again.exit_code == 0 and again.stderr.count("skipped (unchanged)") == 3, again.output

    changed = run_cli("run", DEMO, *fast, "--set", "onnx.device=cpu", "--set", "validate.new_tokens=5")
    assert "prune: skipped" in changed.stderr and "onnx: skipped" in changed.stderr
    assert "validate: ran" in changed.stderr


def test_cli_bad_recipe_is_one_line_exit_2(tmp_path):
    result = run_cli("run", tmp_path / "missing.yaml")
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


# The options of each stage's command that a recipe does not hold, and why. A new option joins the recipe's
# section or this table: the test below fails until it does.
RUN_CONTROL = {"out": "artifacts/<name>/<stage>/", "force": "a recipe redoes what changed", "quiet": "run --quiet",
               "as_json": "the run's summary"}
NOT_IN_RECIPES = {
    ("plan", "prune"): {**RUN_CONTROL, "model": "the recipe's top-level model", "resume": "the heal section's",
                        "heal_data": "the recipe's heal section", "allow_pickle": "unpickling is opted into on the "
                        "command line only", "max_shard_size": "the output's shard size: the command line's"},
    ("heal", "heal"): {**RUN_CONTROL, "teacher": "the recipe's model", "student": "the prune stage's output",
                       "resume": "a recipe reruns a changed stage from the start", "nproc": "a recipe runs in one process",
                       "speedups": "joint healing: a recipe heals the one depth its plan made",
                       "strategy": "joint healing's", "calib": "joint healing's"},
    ("onnx", "onnx"): {**RUN_CONTROL, "model": "the heal or prune stage's output", "allow_pickle": "as prune's",
                       "speedups": "multi-depth exports: from the command line", "strategy": "multi-depth's",
                       "calib": "multi-depth's", "depth_models": "multi-depth's"},
    ("validate", "validate"): {"quiet": "run --quiet", "reference": "the recipe's model",
                               "candidate": "the onnx stage's output", "reference_artifact": "the recipe's model",
                               "depth_references": "multi-depth exports from the command line",
                               "report_path": "artifacts/<name>/report/", "json_path": "artifacts/<name>/report/",
                               "plot_path": "artifacts/<name>/report/",
                               **{o: "a multi-depth export's (onnx --speedups: from the command line)"
                                  for o in ("depth", "speculative", "draft_tokens", "adaptive")}},
    ("triton", "triton"): {"out": "artifacts/<name>/triton/", "force": "a recipe redoes what changed",
                           "as_json": "the run's summary", "model": "the onnx stage's output"},
}


def test_every_recipe_field_is_a_cli_option_and_back():
    from ulsexport.cli import main
    from ulsexport.recipe import SCHEMA

    for (section, command), absent in NOT_IN_RECIPES.items():
        options = {p.name for p in main.commands[command].params}
        fields = set(SCHEMA[section])
        assert fields <= options, f"recipe fields of {section} with no option of `{command}`: {fields - options}"
        assert options - fields == set(absent), f"`{command}` options neither in the recipe nor listed: " \
                                                f"{(options - fields) ^ set(absent)}"


def test_heal_settings_are_the_one_declaration_of_heals_defaults():
    import dataclasses

    from ulsexport.cli import main
    from ulsexport.heal import HealSettings
    from ulsexport.recipe import SCHEMA

    options = {p.name: p for p in main.commands["heal"].params}
    for field in dataclasses.fields(HealSettings):
        assert field.name in options, f"HealSettings.{field.name} has no --{field.name.replace('_', '-')}"
        default = options[field.name].default
        unset = default is None or type(default).__name__ == "Sentinel"   # click 8.3 marks "no default" so
        assert default == field.default or unset and field.default is None, field.name
        if field.name in SCHEMA["heal"]:
            assert SCHEMA["heal"][field.name][1] == field.default, field.name
    joint = {"speedups", "strategy", "calib"}
    assert set(SCHEMA["heal"]) == {f.name for f in dataclasses.fields(HealSettings)} - joint | {"data", "eval_text"}


def test_every_stage_has_one_settings_object_with_the_clis_defaults():
    """Each stage's settings dataclass is where its defaults live: the CLI's options show the same."""
    import dataclasses

    from ulsexport.cli import main
    from ulsexport.export.stage import OnnxSettings
    from ulsexport.heal import HealSettings
    from ulsexport.plan.scoring import PlanSettings
    from ulsexport.serve.repository import TritonSettings
    from ulsexport.validate.stage import ValidateSettings

    for command, settings in (("prune", PlanSettings), ("heal", HealSettings), ("onnx", OnnxSettings),
                              ("validate", ValidateSettings), ("triton", TritonSettings)):
        options = {p.name: p for p in main.commands[command].params}
        for field in dataclasses.fields(settings):
            assert field.name in options, f"{settings.__name__}.{field.name}: no option of `{command}`"
            default, option = field.default, options[field.name]
            given = option.default
            if type(given).__name__ == "Sentinel" or given is None:
                given = False if option.is_flag else None
            if field.name == "batches":
                given = tuple(int(b) for b in given.split(","))
            if field.name in ("keep", "skip", "text"):   # lists the CLI parses
                continue
            assert given == default, f"{command} --{field.name}: {given!r}, {settings.__name__}: {default!r}"
