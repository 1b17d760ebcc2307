import json
import subprocess
import sys

import pytest

from conftest import run_cli
from ulsexport.errors import UserError
from ulsexport.plan.positional import even_layers, first_layers, make_plan, top_layers, uls_layers


@pytest.mark.parametrize("num_layers,speedup,expected", [
    (32, 2, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 31]),
    (32, 3, [0, 3, 6, 9, 12, 15, 18, 21, 24, 31]),
    (30, 5, [0, 6, 12, 18, 24, 29]),
    (24, 1.5, list(range(15)) + [23]),
])
def test_uls_matches_the_authors_rule(num_layers, speedup, expected):
    assert list(make_plan(num_layers, speedup, "uls").kept) == expected


def test_even_spreads_the_skipped_layers():
    kept = even_layers(24, 16)
    assert kept[0] == 0 and kept[-1] == 23 and len(set(kept)) == 16
    gaps = [b - a for a, b in zip(kept, kept[1:])]
    assert max(gaps) <= 2  # uls at this point skips 15-22 in one block


def test_top_and_first():
    assert top_layers(10, 4) == [0, 1, 2, 9]
    assert first_layers(10, 4) == [0, 1, 2, 3]


@pytest.mark.parametrize("num_layers", [4, 5, 12, 16, 24, 32, 40, 80])
@pytest.mark.parametrize("speedup", [1.25, 1.5, 2, 2.5, 3])
def test_every_strategy_keeps_k_distinct_layers_with_first_and_last(num_layers, speedup):
    k = int(num_layers / speedup)
    if k < 2:
        with pytest.raises(UserError):
            make_plan(num_layers, speedup)
        return
    for rule in (uls_layers, even_layers, top_layers):
        kept = rule(num_layers, k)
        assert len(kept) == len(set(kept)) == k and kept == sorted(kept)
        assert kept[0] == 0 and kept[-1] == num_layers - 1


def test_plan_reports_both_predicted_speedups():
    plan = make_plan(32, 2).to_dict()
    assert plan["predicted_speedup"]["layers"] == 2.0
    # The LM head and embedding are not skipped, so the cost model predicts less than 2x.
    assert 1.8 < plan["predicted_speedup"]["cost_model"] < 2.0
    assert sorted(plan["kept"] + plan["skipped"]) == list(range(32))


def test_explicit_keep_and_skip():
    assert make_plan(10, keep=[0, 5, 9]).kept == (0, 5, 9)
    assert make_plan(10, skip=[1, 2]).kept == (0, 3, 4, 5, 6, 7, 8, 9)
    assert make_plan(10, skip=[1, 2]).strategy == "explicit"


@pytest.mark.parametrize("kwargs,message", [
    (dict(speedup=1.0), "greater than 1"),
    (dict(speedup=0.5), "greater than 1"),
    (dict(speedup=20), "at least 2"),
    (dict(keep=[0, 12]), "out of range"),
    (dict(keep=[0, 3, 3]), "listed twice"),
    (dict(skip=[-1]), "out of range"),
    (dict(keep=[0, 1], skip=[2]), "not both"),
    (dict(keep=[4]), "at least 2"),
    (dict(speedup=2, strategy="nope"), "unknown strategy"),
])
def test_bad_plans_are_refused(kwargs, message):
    with pytest.raises(UserError, match=message):
        make_plan(10, **kwargs)


def test_plan_json_cli():
    result = run_cli("plan", "--num-layers", 32, "--speedup", 2, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert set(data) >= {"num_layers", "strategy", "speedup_target", "kept", "skipped", "predicted_speedup"}
    assert data["kept"][-1] == 31 and len(data["kept"]) == 16
    assert set(data["predicted_speedup"]) == {"layers", "cost_model"}


@pytest.mark.parametrize("args", [
    ("--num-layers", 32, "--speedup", 1),
    ("--num-layers", 32, "--keep", "0,1", "--skip", "3"),
    ("--num-layers", 32, "--keep", "0,x"),
    ("--num-layers", 32),
])
def test_plan_cli_errors_are_one_line_exit_2(args):
    result = run_cli("plan", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_plan_module_does_not_import_torch():
    code = "import sys, ulsexport.plan, ulsexport; ulsexport.make_plan(32, 2); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
