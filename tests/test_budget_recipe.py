"""compression.budget: a recipe with a size runs DKM with the planner's layouts, within that size."""
import json
from pathlib import Path

import pytest
import yaml

from torchdkm.app.budget import planned_rules
from torchdkm.app.cli import main
from torchdkm.app.recipe import parse_recipe
from torchdkm.errors import ConfigError

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "digits_mlp.yaml"


def _raw(**compression):
    raw = yaml.safe_load(RECIPE.read_text())
    raw["training"].update(fp32_epochs=3, epochs=1)
    raw["compression"] = {"bits": 2, "tau_scale": 0.07, **compression}
    return raw


@pytest.mark.parametrize("compression, words", [
    ({"plan": {"samples": 8}}, "without compression.budget"),
    ({"budget": "2 bits", "rules": {"net.4": {"bits": 9}}}, "bits"),
    ({"budget": "2 bits", "plan": {"bits": [0, 2]}}, "compression.plan.bits"),
    ({"budget": "2 bits", "plan": {"lut_bits": 8}}, "lut_bits=8"),
    ({"budget": "2 bits", "plan": {"sample": 8}}, "sample"),
    ({"budget": "two bits"}, "compression.budget"),
])
def test_bad_budget_keys_are_refused_with_what_is_allowed(compression, words):
    with pytest.raises(ConfigError, match=words):
        parse_recipe(_raw(**compression))


def test_budget_run_trains_the_plan_within_the_budget(tmp_path):
    """The planner spreads the budget over the layers the rules leave to it: a null rule (here a ``re:`` one) keeps
    its layer as it is, a rule with a layout pins its layer at it (counted in the budget, its own fields kept)."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_raw(budget="4 bits", rules={"re:net\\.4": None, "net.0": {"bits": 3}},
                                        plan={"samples": 16, "dims": [1], "bits": [1, 2, 4], "group_sizes": [None]})))
    assert main(["compress", str(path), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    plan, size = report["plan"], report["size"]
    n_params = 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    assert plan["budget_bytes"] == pytest.approx(4 * n_params / 8)
    stored = {row["name"]: row for row in size["layers"]}
    assert "net.4" not in stored  # the null rule keeps its layer out of the plan and as it is
    assert {r["name"] for r in plan["layers"]} == {"net.2"}
    assert stored["net.0"]["bits"] == 3  # pinned: not a candidate's bits (1, 2, 4)
    for row in plan["layers"]:  # the trained model stores exactly what the plan chose
        if row["config"] != "as is":
            assert stored[row["name"]]["stored_bits"] == row["bits"]
            assert f"{stored[row['name']]['bits']}b" == row["config"].split()[0]
    total = sum(r["stored_bits"] for r in size["layers"]) / 8 + size["other_param_bytes"]
    assert total == pytest.approx(plan["total_bytes"]) and total <= plan["budget_bytes"]
    assert "planned for compression.budget" in (tmp_path / "out" / "report.md").read_text()
    assert report["recipe"] and report["accuracy"]["final"] > 0.8


def test_planned_layouts_keep_the_recipes_training_fields():
    base = parse_recipe(_raw(budget="2 bits")).compression.config
    rules = planned_rules({"a": {"bits": 3, "dim": 1, "group_size": 16, "channel_scale": True,
                                 "vector_axis": "flat"}, "b": None}, base)
    assert rules["b"] is None
    assert (rules["a"].bits, rules["a"].group_size, rules["a"].channel_scale) == (3, 16, True)
    assert rules["a"].tau_scale == 0.07 and rules["a"].min_numel == 0
    pinned = parse_recipe(_raw(budget="2 bits", rules={"re:a": {"bits": 3, "tau_scale": 0.2}})).compression
    rules = planned_rules({"a": {"bits": 3, "dim": 1, "group_size": None, "channel_scale": False,
                                 "vector_axis": "flat"}, "b": {"bits": 2, "dim": 1, "group_size": None,
                                                               "channel_scale": False, "vector_axis": "flat"}},
                          pinned.config, pinned.rules)
    assert (rules["a"].bits, rules["a"].tau_scale) == (3, 0.2)  # a pinned layer keeps its rule's own fields
    assert (rules["b"].bits, rules["b"].tau_scale) == (2, 0.07)


def test_budget_below_the_smallest_model_stops_the_run_with_the_smallest_size(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_raw(budget="0.05 bits", plan={"samples": 8, "dims": [1], "bits": [1]})))
    assert main(["compress", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "below the smallest model" in err and "bits/weight" in err
