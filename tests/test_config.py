"""Config: YAML + overrides merge onto the typed schema; every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddp_trainer import config
from ddp_trainer.errors import UsageError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_every_shipped_recipe_loads():
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = config.load(path)
        assert cfg.output_dir.startswith("runs/"), path


def test_defaults_are_the_digits_recipe_without_a_file():
    cfg = config.load(None)
    assert (cfg.data.name, cfg.model.name, cfg.optim.name) == ("digits", "mlp", "adamw")


def test_overrides_are_converted_to_the_schema_types():
    cfg = config.load(CONFIGS / "digits_mlp.yaml", ["optim.lr=3e-4", "trainer.epochs=7", "model.hidden_sizes=[32]"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.trainer.epochs == 7
    assert cfg.model.hidden_sizes == [32]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim.lrr=0.1", "'optim.lrr'"),
        ("trainer.epochs=ten", "'trainer.epochs'"),
        ("data.name=imagenet", "'data.name'"),
        ("model.name=resnet9000", "'model.name'"),
        ("trainer.device=tpu", "'trainer.device'"),
        ("data.batch_size=0", "'data.batch_size'"),
        ("model._target_=no_such_module.make", "'model._target_'"),
    ],
)
def test_bad_value_names_its_key_in_one_line(override, named):
    with pytest.raises(UsageError) as raised:
        config.load(CONFIGS / "digits_mlp.yaml", [override])
    message = str(raised.value)
    assert named in message
    assert "\n" not in message


def test_misspelt_key_suggests_the_right_one():
    with pytest.raises(UsageError, match="Did you mean"):
        config.load(None, ["optim.lrr=0.1"])


def test_override_without_equals_sign_is_refused():
    with pytest.raises(UsageError, match="'trainer.epochs'"):
        config.load(None, ["trainer.epochs"])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(UsageError, match="nope.yaml"):
        config.load(tmp_path / "nope.yaml")


def test_target_sibling_keys_become_factory_kwargs(tmp_path):
    recipe = tmp_path / "own.yaml"
    recipe.write_text("model:\n  _target_: factories.small_net\n  hidden: 5\ndata:\n  _target_: factories.blobs\n")
    cfg = config.load(recipe, ["data.train_size=10"])
    assert cfg.model.kwargs == {"hidden": 5}
    assert cfg.data.kwargs == {"train_size": 10}


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = config.load(CONFIGS / "cifar10_resnet18.yaml", ["seed=3"])
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml(cfg))
    assert config.load(saved) == cfg
