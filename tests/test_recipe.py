"""Recipe validation: every mistake is a ConfigError that names the key, what was given and what is allowed."""
from pathlib import Path

import pytest

from torchdkm import ConfigError, DKMConfig
from torchdkm.app.build import build_data, build_model
from torchdkm.app.recipe import load_recipe, parse_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _raw(**sections):
    raw = {"model": {"name": "mlp"}, "data": {"name": "digits"}}
    raw.update(sections)
    return raw


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.training.epochs >= 1


def test_defaults_and_rules_inherit_global_config():
    r = parse_recipe(_raw(compression={"bits": 3, "dim": 2, "rules": {"net.4": {"bits": 8}, "re:net\\.0": None}}))
    assert r.compression.config == DKMConfig(bits=3, dim=2)
    assert r.compression.rules == {"net.4": DKMConfig(bits=8, dim=2), "re:net\\.0": None}
    assert r.training.optimizer == "adam" and r.training.fp32_epochs == 0
    assert r.name == "recipe"


def test_yaml_exponent_numbers_are_accepted(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: mlp}\ndata: {name: digits}\ntraining: {lr: 1e-3}\n"
                    "compression: {eps: 1e-6, direct_grad: 5e-1}\n")
    r = load_recipe(path)
    assert r.training.lr == 1e-3 and r.compression.config.eps == 1e-6 and r.compression.config.direct_grad == 0.5
    assert r.name == "r"


@pytest.mark.parametrize("raw, words", [
    (_raw(trainin={}), ["unknown key(s) ['trainin']", "allowed keys are: name, model, data, training, compression"]),
    (_raw(training={"epoch": 3}), ["training", "['epoch']", "epochs", "fp32_epochs", "batch_size"]),
    (_raw(compression={"bitz": 3}), ["compression", "['bitz']", "bits", "tau_scale", "rules"]),
    (_raw(compression={"rules": {"fc": {"bit": 2}}}), ["compression.rules['fc']", "['bit']", "bits"]),
    ({"model": {"name": "mlp"}}, ["missing required key(s) ['data']"]),
    (_raw(model={"name": "resnet9000"}), ["model.name='resnet9000'", "resnet_small", "package.module:function"]),
    (_raw(data={"name": "mnist"}), ["data.name='mnist'", "fashion_mnist, mnist_5k, digits, bbc_news"]),
    (_raw(training={"optimizer": "lamb"}), ["training.optimizer='lamb'", "sgd, adam, adamw"]),
    (_raw(training={"schedule": "step"}), ["training.schedule='step'", "constant, cosine"]),
    (_raw(training={"epochs": -1}), ["training.epochs=-1", "integer >= 0"]),
    (_raw(training={"batch_size": 32.5}), ["training.batch_size=32.5", "integer >= 1"]),
    (_raw(training={"batch_size": True}), ["training.batch_size=True", "integer >= 1"]),
    (_raw(training={"lr": "fast"}), ["training.lr='fast'", "finite number > 0"]),
    (_raw(training={"lr": 0}), ["training.lr=0", "> 0"]),
    (_raw(training={"epochs": 0, "fp32_epochs": 0}), ["nothing to train"]),
    (_raw(compression={"bits": 9}), ["compression", "bits=9", "1..8"]),
    (_raw(compression={"tau": "hot"}), ["compression", "tau='hot'", "'auto'"]),
    (_raw(compression={"rules": {"fc": {"dim": 0}}}), ["compression.rules['fc']", "dim=0"]),
    (_raw(compression={"rules": ["fc"]}), ["compression.rules must be a mapping", "list"]),
    (_raw(model={"name": "mlp", "kwargs": [1]}), ["model.kwargs must be a mapping"]),
    (_raw(training=[1, 2]), ["training must be a mapping"]),
    ([1, 2], ["recipe must be a mapping"]),
])
def test_validation_errors_say_what_and_what_is_allowed(raw, words):
    with pytest.raises(ConfigError) as e:
        parse_recipe(raw)
    for w in words:
        assert w in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model: {name: mlp}\ndata: {name: digits}\ntraining: {epochz: 1}\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml.*epochz"):
        load_recipe(wrong)


def test_custom_functions_and_kwargs_are_checked():
    r = parse_recipe(_raw(model={"name": "torchdkm.app.zoo.models:MLP", "kwargs": {"hidden": 16}}))
    assert build_model(r.model).net[0].out_features == 16
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg.models'"):
        build_model(parse_recipe(_raw(model={"name": "no_such_pkg.models:net"})).model)
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        build_model(parse_recipe(_raw(model={"name": "torchdkm.app.zoo.models:nope"})).model)
    with pytest.raises(ConfigError, match="model.kwargs.*do not fit model 'mlp'"):
        build_model(parse_recipe(_raw(model={"name": "mlp", "kwargs": {"widht": 3}})).model)
    with pytest.raises(ConfigError, match="data.kwargs.*do not fit"):
        build_data(parse_recipe(_raw(data={"name": "digits", "kwargs": {"fraction": 0.5}})).data)
    with pytest.raises(ConfigError, match="not an nn.Module"):
        build_model(parse_recipe(_raw(model={"name": "torchdkm.config:DKMConfig"})).model)


def test_model_checkpoint_is_loaded_and_checked(tmp_path):
    import torch

    from torchdkm.app.zoo.models import MLP

    torch.manual_seed(3)
    src = MLP(hidden=16)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    spec = parse_recipe(_raw(model={"name": "mlp", "kwargs": {"hidden": 16}, "checkpoint": str(tmp_path / "w.pt")}))
    assert torch.equal(build_model(spec.model).net[0].weight, src.net[0].weight)
    spec = parse_recipe(_raw(model={"name": "mlp", "checkpoint": str(tmp_path / "w.pt")}))
    with pytest.raises(ConfigError, match="does not fit model 'mlp'"):
        build_model(spec.model)
