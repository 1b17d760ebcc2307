"""Joint healing: one set of weights trained for several depths (`heal --speedups`), each depth's plan
recorded and reused by `prune --speedup`; layers that no depth keeps stay as they were."""
import json

import pytest
import torch
from safetensors import safe_open

from conftest import DATA, KJV16, run_cli
from ulsexport.prune import plan_for_model


def _tensor(folder, name):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


@pytest.fixture(scope="module")
def healed(tmp_path_factory):
    out = tmp_path_factory.mktemp("joint") / "healed"
    result = run_cli("heal", "--teacher", KJV16, "--speedups", "2,3", "--data", DATA / "kjv-train.txt",
                     "--eval-text", DATA / "kjv-valid.txt", "--steps", 4, "--batch", 2, "--seq-len", 32,
                     "--eval-tokens", 4000, "--eval-samples", 4, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    assert "2x (8 layers)" in result.stdout and "3x (5 layers)" in result.stdout
    return out


def test_every_depth_is_recorded_and_trained(healed):
    manifest = json.loads((healed / "ulsexport.json").read_text())
    depths = manifest["trained_depths"]
    assert [d["speedup"] for d in depths] == [2.0, 3.0]
    assert [d["kept"] for d in depths] == [list(plan_for_model(KJV16, s).kept) for s in (2, 3)]
    assert manifest["healing"]["mode"] == "joint" and manifest["healing"]["steps"] == 4
    assert all(d["perplexity_after"] > 1 and d["perplexity_before"] > 1 for d in depths)
    config = json.loads((healed / "config.json").read_text())
    assert config["num_hidden_layers"] == 16  # the original depth: every layer is kept


def test_layers_no_depth_keeps_stay_as_they_were(healed):
    manifest = json.loads((healed / "ulsexport.json").read_text())
    trained = {layer for d in manifest["trained_depths"] for layer in d["kept"]}
    untouched = sorted(set(range(16)) - trained)
    assert untouched, "the plans keep every layer between them; nothing to check"
    name = "model.layers.{}.mlp.down_proj.weight"
    for layer in untouched:
        assert torch.equal(_tensor(healed, name.format(layer)), _tensor(KJV16, name.format(layer)))
    assert not torch.equal(_tensor(healed, name.format(min(trained))), _tensor(KJV16, name.format(min(trained))))


def test_prune_reuses_the_trained_plan(healed, tmp_path):
    manifest = json.loads((healed / "ulsexport.json").read_text())
    result = run_cli("prune", "--model", healed, "--speedup", 3, "--json", "--out", tmp_path / "3x")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kept"] == manifest["trained_depths"][1]["kept"]


def test_joint_healing_needs_a_teacher(tmp_path):
    result = run_cli("heal", "--speedups", "2,3", "--data", DATA / "kjv-train.txt", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "needs --teacher" in result.stderr
    result = run_cli("heal", "--teacher", KJV16, "--data", DATA / "kjv-train.txt", "--out", tmp_path / "y")
    assert result.exit_code == 2 and "--student" in result.stderr
