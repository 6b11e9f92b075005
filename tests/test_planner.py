"""The planner: knapsack against brute force, predicted size against the saved file, refusals."""
import copy
import itertools
import random

import pytest
import torch
from torch import nn

import torchdkm
from torchdkm import DKMConfig
from torchdkm.errors import ConfigError
from torchdkm.planner import candidate_bits, default_candidates, fit_config, parse_budget, plan, solve_mckp
from torchdkm.ptq import palettize, weighted_error
from torchdkm.sensitivity import fisher_diagonal


def _brute(sizes, losses, budget):
    best = None
    for pick in itertools.product(*[range(len(s)) for s in sizes]):
        if sum(s[j] for s, j in zip(sizes, pick)) <= budget:
            loss = sum(l[j] for l, j in zip(losses, pick))
            best = loss if best is None or loss < best else best
    return best


def test_knapsack_matches_brute_force():
    rng = random.Random(0)
    for trial in range(60):
        groups = rng.randint(1, 4)
        sizes = [[rng.randint(1, 40) for _ in range(rng.randint(1, 5))] for _ in range(groups)]
        losses = [[rng.random() * 10 for _ in s] for s in sizes]
        budget = rng.randint(0, 120)
        want = _brute(sizes, losses, budget)
        got = solve_mckp(sizes, losses, budget)
        if want is None:
            assert got is None
            continue
        assert sum(s[j] for s, j in zip(sizes, got)) <= budget
        assert abs(sum(l[j] for l, j in zip(losses, got)) - want) < 1e-9


def test_knapsack_with_coarse_units_fits_and_keeps_its_bound():
    rng = random.Random(1)
    for trial in range(40):
        sizes = [[rng.randint(100, 4000) for _ in range(4)] for _ in range(4)]
        losses = [[rng.random() for _ in s] for s in sizes]
        budget = rng.randint(2000, 12000)
        got = solve_mckp(sizes, losses, budget, resolution=64)
        if got is None:
            assert _brute(sizes, losses, budget) is None
            continue
        assert sum(s[j] for s, j in zip(sizes, got)) <= budget
        unit = -(-budget // 64)
        weaker = _brute(sizes, losses, budget - len(sizes) * unit)
        if weaker is not None:
            assert sum(l[j] for l, j in zip(losses, got)) <= weaker + 1e-9


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


_SMALL = default_candidates(bits=(1, 2, 3, 4), dims=(1, 2), group_sizes=(None, 16), channel_scale=(False, True))


@pytest.mark.parametrize("budget", ["2.5 bits", "1.2 bits", 3000])
def test_plan_size_is_the_saved_files_size(tmp_path, budget):
    net, x = _net(), torch.randn(6, 3, 8, 8)
    sens = fisher_diagonal(net, [x])
    p = plan(net, sensitivity=sens, budget=budget, candidates=_SMALL)
    assert p.total_bytes <= p.budget_bytes
    assert set(p.rules) == {"0", "2", "6"}
    out = palettize(copy.deepcopy(net), rules=p.rules, sensitivity=sens)
    torchdkm.save(out, tmp_path / "m.safetensors")
    back = torchdkm.load(tmp_path / "m.safetensors", _net())
    assert torchdkm.report(back, print_table=False).compressed_bytes == p.total_bytes
    assert torchdkm.report(out, print_table=False).compressed_bytes == p.total_bytes
    text = p.table()
    assert "vs budget" in text and "est. dloss" in text


def test_dim1_estimates_equal_the_palettized_error():
    net, x = _net(), torch.randn(6, 3, 8, 8)
    sens = fisher_diagonal(net, [x])
    cands = default_candidates(bits=(2, 3), dims=(1,), group_sizes=(None, 16), channel_scale=(False, True))
    p = plan(net, sensitivity=sens, budget="3 bits", candidates=cands, bins=None)  # every value its own bin
    out = palettize(copy.deepcopy(net), rules=p.rules, sensitivity=sens)
    ref, got = dict(net.named_modules()), dict(out.named_modules())
    for r in p.rows:
        actual = weighted_error(ref[r.name].weight, got[r.name].weight, sens.fisher[r.name])
        assert actual == pytest.approx(r.choice.dloss, rel=1e-4, abs=1e-12)  # float32 weights and LUT


def test_budget_below_the_smallest_model_is_refused_with_the_smallest_size():
    net = _net()
    sens = fisher_diagonal(net, [torch.randn(2, 3, 8, 8)])
    with pytest.raises(ConfigError, match=r"smallest model these candidates can make: (\d+) bytes") as e:
        plan(net, sensitivity=sens, budget_bytes=200, candidates=_SMALL)
    smallest = int(e.value.args[0].split("can make: ")[1].split(" bytes")[0])
    p = plan(net, sensitivity=sens, budget_bytes=smallest, candidates=_SMALL)
    assert p.total_bytes <= smallest


def test_budget_parsing_and_group_fitting():
    assert parse_budget("64KiB") == ("bytes", 65536.0)
    assert parse_budget("2.5 bits") == ("bits", 2.5)
    assert parse_budget("1.5MB") == ("bytes", 1.5e6)
    with pytest.raises(ConfigError, match="'lots'"):
        parse_budget("lots")
    assert fit_config(DKMConfig(group_size=16), (24, 8)).group_size == 12
    assert fit_config(DKMConfig(group_size=16), (10, 8)).group_size is None
    assert candidate_bits(DKMConfig(bits=2), (128, 256)) == 32768 * 2 + 4 * 32
    with pytest.raises(ConfigError, match="exactly one budget"):
        plan(_net(), [torch.randn(1, 3, 8, 8)])


def test_tied_weights_get_one_rule_for_both():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(64, 32)
            self.head = nn.Linear(32, 64, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    lm = LM()
    p = plan(lm, [torch.randint(0, 64, (2, 5))], budget="3 bits", candidates=_SMALL)
    assert [r.name for r in p.rows] == ["emb"] and p.rules["head"] == p.rules["emb"]
    out = palettize(lm, rules=p.rules, calibration=[torch.randint(0, 64, (2, 5))])
    assert torchdkm.report(out, print_table=False).compressed_bytes == p.total_bytes


def test_plan_command_prints_the_table_and_writes_recipe_rules(tmp_path, capsys):
    import yaml
    from pathlib import Path

    from torchdkm.app.cli import main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "digits_mlp.yaml"
    out = tmp_path / "rules.yaml"
    assert main(["plan", str(recipe), "--budget", "3bits", "--samples", "16", "--dims", "1", "--rules-out",
                 str(out)]) == 0
    assert "vs budget" in capsys.readouterr().out
    rules = yaml.safe_load(out.read_text())["rules"]
    assert set(rules) == {"net.0", "net.2", "net.4"}
    assert main(["plan", str(recipe), "--budget", "10"]) == 2
    assert "smallest model" in capsys.readouterr().err
    raw = yaml.safe_load(recipe.read_text())  # the recipe's rules: net.0 pinned at 4 bits, net.4 left as it is
    raw["compression"]["rules"] = {"net.0": {"bits": 4}, "re:net\\.4": None}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert main(["plan", str(tmp_path / "r.yaml"), "--budget", "5bits", "--samples", "16", "--dims", "1",
                 "--rules-out", str(out)]) == 0
    assert "1 layer(s) pinned" in capsys.readouterr().out
    rules = yaml.safe_load(out.read_text())["rules"]
    assert rules["net.0"]["bits"] == 4 and rules["net.4"] is None and rules["net.2"] is not None


def test_pinned_layers_keep_their_config_and_the_rest_fills_the_budget():
    """A pinned (tied) embedding gets its config for both its readers, counted at its size; the other layers are
    planned within what is left, and the palettized model is exactly the planned size."""
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(512, 32)
            self.mid = nn.Linear(32, 32)
            self.head = nn.Linear(32, 512, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.relu(self.mid(self.emb(ids))))

    torch.manual_seed(0)
    lm, ids = LM(), [torch.randint(0, 512, (2, 5))]
    sens = fisher_diagonal(lm, ids)
    pin = DKMConfig(bits=1, group_size=16)
    p = plan(lm, sensitivity=sens, budget="3 bits", candidates=_SMALL, pinned={"head": pin})
    assert [r.name for r in p.rows] == ["mid"]
    assert p.rules["emb"] == p.rules["head"] == pin.replace(min_numel=0)
    free = plan(lm, sensitivity=sens, budget="3 bits", candidates=_SMALL)
    assert free.rules["emb"] != p.rules["emb"]  # unpinned, the planner gives the embedding another layout
    assert p.total_bytes <= p.budget_bytes
    out = palettize(copy.deepcopy(lm), rules=p.rules, sensitivity=sens)
    assert torchdkm.report(out, print_table=False).compressed_bytes == p.total_bytes
    with pytest.raises(ConfigError, match="'nope' is not a compressible layer"):
        plan(lm, sensitivity=sens, budget="3 bits", candidates=_SMALL, pinned={"nope": pin})
    with pytest.raises(ConfigError, match="does not fit"):
        plan(lm, sensitivity=sens, budget="3 bits", candidates=_SMALL, pinned={"mid": DKMConfig(dim=5, channel_scale=True)})
