"""Config: YAML + overrides merge onto the typed schema; every mistake names its key."""

from __future__ import annotations

import dataclasses
import operator
from pathlib import Path

import numpy
import pytest
from conftest import read_metrics

from ddp_trainer import api, changes, config, data, models
from ddp_trainer.cli.train import main
from ddp_trainer.errors import UsageError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_every_shipped_recipe_loads():
    recipes = sorted(CONFIGS.glob("*.yaml"))
    assert len(recipes) >= 5, recipes
    for path in recipes:
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
        ("trainer.strategy=zero3", "'trainer.strategy'"),
        ("trainer.fsdp_wrap=[resnet.BasicBlock]", "'trainer.fsdp_wrap'"),
        # Values torch refused only once the run had started (or, for these two, silently took as "no limit").
        ("trainer.max_steps=0", "'trainer.max_steps'"),
        ("trainer.max_steps=-5", "'trainer.max_steps'"),
        ("model.hidden_sizes=[64,0]", "'model.hidden_sizes'"),
        ("model.cifar_stem=true", "config key 'model.cifar_stem' has invalid value True"),  # the mlp took it silently
        ("model.hidden_sizes=[[1]]", "config key 'model.hidden_sizes' has invalid value [[1]]"),  # named 'model'
        ("model.num_classes=0", "'model.num_classes'"),
        ("optim.weight_decay=-1", "'optim.weight_decay'"),
        ("optim.momentum=-0.9", "'optim.momentum'"),
        ("optim.gamma=-1", "'optim.gamma'"),
        ("optim.momentum=5", "'optim.momentum'"),  # the loss went non-finite at step 20
        ("optim.gamma=5", "'optim.gamma'"),  # a "decay" that multiplied the rate by 5 every step_epochs
        ("optim.min_lr=-1e-5", "'optim.min_lr'"),
        ("trainer.startup_timeout_s=1e300", "'trainer.startup_timeout_s'"),  # was an OverflowError on every rank
        ("trainer.dist_timeout_s=.nan", "'trainer.dist_timeout_s'"),
        ("trainer.startup_timeout_s=1e-300", "'trainer.startup_timeout_s'"),  # 0 ms: every collective failed at once
        # A value of another shape than the schema's or the file's: OmegaConf's merge names no key for these.
        ("trainer=5", "config key 'trainer' is a section of keys, not 5"),
        ("data=[1]", "config key 'data' is a section of keys, not [1]"),
        ("data.synthetic=[1]", "config key 'data.synthetic' is a section of keys, not [1]"),
        (
            "trainer.fsdp_wrap={a: 1}",
            "config key 'trainer.fsdp_wrap' is a list, not {'a': 1}: give it whole, trainer.fsdp_wrap=[...]",
        ),
        (
            "model.hidden_sizes.0=128",
            "config key 'model.hidden_sizes' is a list, not {'0': 128}: give it whole, model.hidden_sizes=[...]",
        ),
        ("data.synthetic.val_size=0", "config key 'data.synthetic.val_size' has invalid value 0"),
        ("data.synthetic.num_classes=1", "config key 'data.synthetic.num_classes' has invalid value 1"),
        ("data.synthetic.input_shape=[3,0,4]", "config key 'data.synthetic.input_shape' has invalid value [3, 0, 4]"),
        # Was a traceback from torch.manual_seed.
        ("seed=99999999999999999999", "config key 'seed' has invalid value 99999999999999999999: expected 0 to 2**32"),
        ("seed=4294967296", "config key 'seed' has invalid value 4294967296"),  # was seed 0's run again
        ("seed=-1", "config key 'seed' has invalid value -1"),  # was seed 4294967295's run
        ("optim.lr=.inf", "config key 'optim.lr' has invalid value inf"),  # stopped at step 2 on a non-finite loss
        ("trainer.grad_clip_norm=.inf", "config key 'trainer.grad_clip_norm' has invalid value inf"),
        # Past sys.maxsize: a traceback from islice() in the DataLoader's batch sampler once the run had started.
        (
            "data.batch_size=99999999999999999999",
            "'data.batch_size' has invalid value 99999999999999999999: expected at most",
        ),
        (
            "data.num_workers=99999999999999999999",
            "'data.num_workers' has invalid value 99999999999999999999: expected at most",
        ),
        # Past sys.maxsize inside a list or as a class count: torch's "Overflow when unpacking long long" traceback.
        (
            "model.hidden_sizes=[64,99999999999999999999]",
            "'model.hidden_sizes' has invalid value [64, 99999999999999999999]",
        ),
        (
            "model.num_classes=99999999999999999999",
            "'model.num_classes' has invalid value 99999999999999999999: expected at",
        ),
        ("data.synthetic.input_shape=[3,99999999999999999999]", "'data.synthetic.input_shape' has invalid value [3, 9"),
        # Past these, a DataLoader started its workers for hours (prefetch) or a list took all memory (class names).
        ("data.prefetch_factor=9223372036854775807", "'data.prefetch_factor' has invalid value 9223372036854775807"),
        ("data.synthetic.num_classes=100000000000", "'data.synthetic.num_classes' has invalid value 100000000000"),
        ("trainer.max_steps=99999999999999999999", "'trainer.max_steps' has invalid value 99999999999999999999"),
        ("data.stream.input_shape=5", "config key 'data.stream.input_shape' is a list, not 5: give it whole"),
        ("trainer.allow_changes=[[1]]", "'trainer.allow_changes' has invalid value [[1]]"),  # unhashable type: 'list'
        # An empty override is null: OmegaConf's "Incompatible value 'None' for field of type 'int'" named no fix.
        ("trainer.epochs=", "config key 'trainer.epochs' is empty (or null): it needs a value"),
        ("model.hidden_sizes=", "config key 'model.hidden_sizes' is empty (or null): it needs a value, [] for none"),
        ("model.hidden_sizes=[8,null]", "config key 'model.hidden_sizes[1]' is empty (or null): it needs a value"),
    ],
)
def test_bad_value_names_its_key_in_one_line(override, named):
    with pytest.raises(UsageError) as raised:
        config.load(CONFIGS / "digits_mlp.yaml", [override])
    message = str(raised.value)
    assert named in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["trainer.strategy=fsdp", "trainer.precision=fp16"], "'trainer.precision'"),
        (["trainer.strategy=fsdp", "trainer.compile=true"], "'trainer.compile'"),
        (["trainer.activation_checkpointing=true"], "'trainer.activation_checkpointing'"),
    ],
)
def test_what_the_strategy_cannot_do_is_refused_naming_its_key(overrides, named):
    with pytest.raises(UsageError) as raised:
        config.load(None, overrides)
    assert named in str(raised.value)
    assert "strategy" in str(raised.value)


def test_fsdp_takes_bf16_activation_checkpointing_and_its_own_blocks():
    overrides = ["trainer.strategy=fsdp", "trainer.precision=bf16", "trainer.activation_checkpointing=true"]
    cfg = config.load(None, [*overrides, "trainer.fsdp_wrap=[Block]"])
    assert (cfg.trainer.strategy, cfg.trainer.fsdp_wrap) == ("fsdp", ["Block"])
    assert "BasicBlock" in config.load(None).trainer.fsdp_wrap  # torchvision's ResNets shard per block by default


def test_misspelt_key_suggests_the_right_one():
    with pytest.raises(UsageError, match=r"^unknown config key 'optim.lrr' \(Did you mean: 'lr'\?\)$"):
        config.load(None, ["optim.lrr=0.1"])
    # OmegaConf suggests keys of the same level only: a key given at the top or in another section got no hint.
    for key, home in (
        ("lr", "'optim.lr'"),
        ("batch_size", "'data.batch_size'"),
        ("mode", "'checkpoint.mode' or 'logging.wandb.mode'"),
        ("project", "'logging.wandb.project'"),
        ("trainer.lr", "'optim.lr'"),
        ("optim.epochs", "'trainer.epochs'"),  # OmegaConf's own guess was 'step_epochs'
        ("trainer.seed", "'seed'"),
    ):
        with pytest.raises(UsageError, match=rf"^unknown config key '{key}' \(Did you mean: {home}\?\)$"):
            config.load(None, [f"{key}=1"])
    with pytest.raises(UsageError, match=r"^unknown config key 'nosuch'$"):
        config.load({"nosuch": 1})


def test_override_without_equals_sign_is_refused():
    with pytest.raises(UsageError, match="'trainer.epochs'"):
        config.load(None, ["trainer.epochs"])


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("model.hidden_sizes=[64,32", "did not find expected ',' or ']'"),
        ('data.root="/x', "found unexpected end of stream"),
    ],
)
def test_override_whose_value_is_not_yaml_is_named_in_one_line(override, problem):
    with pytest.raises(UsageError) as refused:
        config.load(None, ["seed=1", override])
    assert str(refused.value) == f"override {override!r} could not be parsed: {problem}"


@pytest.mark.parametrize("override", ["output_dir=#x", "data.root=/data #2", "data.root=/data\t#2"])
def test_override_whose_value_yaml_would_cut_at_a_comment_is_refused_with_the_quoted_spelling(override):
    # output_dir=#x was read as output_dir=None: a type error that never said why; /data #2 silently became /data.
    with pytest.raises(UsageError) as refused:
        config.load(None, [override])
    key, _, value = override.partition("=")
    assert str(refused.value).endswith(f"quote the value: {key}='\"{value}\"'")
    assert operator.attrgetter(key)(config.load(None, [f'{key}="{value}"'])) == value


def test_a_hash_that_yaml_keeps_passes_and_a_list_it_cuts_is_named():
    cfg = config.load(None, ["data.root=/data#2", "model._target_=factories.AnyOptions", "model.tags=['a #1', b]"])
    assert (cfg.data.root, cfg.model.kwargs["tags"]) == ("/data#2", ["a #1", "b"])
    with pytest.raises(UsageError, match=r"drops the rest; quote the text that holds it$"):
        config.load(None, ["model._target_=factories.AnyOptions", "model.tags=[a, b] #1"])


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("seed: 1\ntrainer:\n  epochs: 2\nseed: 2\n", "found duplicate key seed (line 4)"),
        ("seed: [1\n", "did not find expected ',' or ']' (line 2)"),
    ],
)
def test_a_yaml_file_that_does_not_parse_is_refused_with_its_problem_and_line(tmp_path, text, problem):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(UsageError) as refused:
        config.load(recipe)
    assert str(refused.value) == f"config file {recipe} is not valid YAML: {problem}"


def test_a_value_omegaconf_cannot_hold_in_a_dict_config_is_named_by_its_key():
    with pytest.raises(UsageError, match=r"^config key 'optim.lr' has a wrong type: Value 'float64' is not"):
        config.load_for_objects({"optim": {"lr": numpy.float64(1e-3)}})  # a sweep's numpy.logspace, say


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(UsageError, match="nope.yaml does not exist"):
        config.load(tmp_path / "nope.yaml")
    with pytest.raises(UsageError, match=f"^config file {tmp_path} is a folder$"):
        config.load(tmp_path)


@pytest.mark.parametrize(
    ("text", "said"),
    [("5\n", "must hold a mapping of keys, not one int value"), ("- 1\n", "must hold a mapping of keys, not a list")],
)
def test_a_config_file_of_one_value_or_a_list_is_named_for_what_it_holds(tmp_path, text, said):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)  # a single value was "is not valid YAML: Invalid loaded object type: int"
    with pytest.raises(UsageError, match=f"^config file {recipe} {said}$"):
        config.load(recipe)


def test_a_config_file_that_cannot_be_read_says_so_not_that_it_is_not_yaml():
    with pytest.raises(
        UsageError, match=r"^config file /proc/self/mem cannot be read \(\[Errno 5\] Input/output error\)$"
    ):
        config.load("/proc/self/mem")  # reading it fails as a file without read permission does, even for root


def test_target_sibling_keys_become_factory_kwargs(tmp_path):
    recipe = tmp_path / "own.yaml"
    recipe.write_text("model:\n  _target_: factories.small_net\n  hidden: 5\ndata:\n  _target_: factories.blobs\n")
    cfg = config.load(recipe, ["data.train_size=10"])
    assert cfg.model.kwargs == {"hidden": 5}
    assert cfg.data.kwargs == {"train_size": 10}


def test_an_interpolation_may_name_a_factory_keyword(tmp_path):
    recipe = tmp_path / "own.yaml"
    recipe.write_text("model:\n  _target_: factories.small_net\n  hidden: 32\noutput_dir: runs/h${model.hidden}\n")
    cfg = config.load(recipe)  # before: "Interpolation key 'model.hidden' not found", hidden having moved to kwargs
    assert (cfg.output_dir, cfg.model.kwargs) == ("runs/h32", {"hidden": 32})


def test_an_escaped_interpolation_stays_text_through_the_run_its_yaml_and_its_checkpoint(tmp_path):
    # `\${...}` is OmegaConf's way to write the text `${...}`: it was resolved once to that text, then looked up as a
    # key when the schema took it, so the run stopped: "Interpolation key 'run' not found".
    written = ["logging.wandb.name=\\${run}", "data.root=a\\\\\\${b}", "output_dir=h${seed}"]
    cfg = config.load(None, written)
    wanted = ("${run}", "a\\${b}", "h0")
    assert (cfg.logging.wandb.name, cfg.data.root, cfg.output_dir) == wanted
    (tmp_path / "config.yaml").write_text(config.to_yaml(cfg))
    for again in (config.load(tmp_path / "config.yaml"), config.from_container(config.to_container(cfg))):
        assert (again.logging.wandb.name, again.data.root, again.output_dir) == wanted


def test_schema_keys_the_model_factory_takes_reach_it():
    cfg = config.load(None, ["model._target_=factories.classifier", "model.num_classes=5", "model.dropout=0.25"])
    dropout, linear = models.build(cfg.model, (8,), dataset_classes=3)
    assert (linear.out_features, dropout.p) == (5, 0.25)
    assert (cfg.model.num_classes, cfg.model.dropout) == (5, 0.25)


def test_data_root_reaches_a_dataset_factory_that_takes_it():
    cfg = config.load(None, ["data._target_=factories.folder_blobs", "data.root=/datasets/mine"])
    train, val = data.map_datasets(cfg.data)
    assert train.root == val.root == "/datasets/mine"


def test_the_ranks_compare_every_key_but_a_nodes_own_data_root_and_rank_0s_logging():
    # A node's own copy of the data may sit elsewhere; a factory that takes `root` gets it in data.kwargs too.
    cfg = config.load(None, ["data._target_=factories.folder_blobs", "data.root=/scratch/node7", "optim.lr=0.5"])
    assert cfg.data.kwargs["root"] == "/scratch/node7"
    compared = changes.across_ranks(cfg)
    assert [key for key in compared if "root" in key or key.startswith(("logging.", "trainer.progress_bar"))] == []
    assert (compared["optim.lr"], compared["data._target_"]) == (0.5, "factories.folder_blobs")


def test_trainer_key_the_factory_does_not_take_stays_with_the_trainer_only():
    cfg = config.load(None, ["data._target_=factories.blobs", "data.batch_size=8", "data.num_workers=2"])
    assert (cfg.data.batch_size, cfg.data.num_workers, cfg.data.kwargs) == (8, 2, {})


def test_factory_taking_any_keyword_gets_every_key_written():
    cfg = config.load(None, ["model._target_=factories.AnyOptions", "model.channels_last=true", "model.width=3"])
    model = models.build(cfg.model, (8,), dataset_classes=3)
    assert model.options == {"channels_last": True, "width": 3}
    assert cfg.model.channels_last  # the trainer reads it as well


def test_argument_the_factory_requires_is_named_when_missing():
    with pytest.raises(UsageError) as refused:
        config.load(None, ["model._target_=torch.nn.Linear", "model.in_features=64"])
    assert str(refused.value) == "config key 'model.out_features' is missing: torch.nn.Linear requires it"
    cfg = config.load(None, ["model._target_=torch.nn.Linear", "model.in_features=64", "model.out_features=10"])
    assert models.build(cfg.model, (64,), dataset_classes=10).out_features == 10


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.widht=3", "'model.widht'"),
        ("model.kwargs.widht=3", "'model.kwargs.widht'"),
    ],
)
def test_key_the_factory_does_not_take_is_refused_naming_key_and_factory(override, named):
    with pytest.raises(UsageError) as raised:
        config.load(None, ["model._target_=factories.small_net", override])
    assert str(raised.value) == (
        f"config key {named} is not a parameter of factories.small_net (it takes features, hidden, classes)"
    )


@pytest.mark.parametrize(
    ("overrides", "refusal"),
    [
        # Both reached the schema, kwargs' value was overwritten: the factory ran with the other, silently.
        (
            ["model._target_=factories.classifier", "model.dropout=0.1", "model.kwargs.dropout=0.3"],
            "config keys 'model.dropout' (0.1) and 'model.kwargs.dropout' (0.3) both give factories.classifier its "
            "dropout: set one",
        ),
        (
            ["data._target_=factories.folder_blobs", "data.root=/r", "data.kwargs.root=/k"],
            "config keys 'data.root' ('/r') and 'data.kwargs.root' ('/k') both give factories.folder_blobs its root: "
            "set one",
        ),
        # Raw OmegaConf and TypeError tracebacks.
        (
            ["model._target_=factories.small_net", "model.kwargs=5"],
            "config key 'model.kwargs' is a section of keys, not 5",
        ),
        (
            ["model._target_=factories.by_position"],
            "factories.by_position takes width by position only, which no config key can give: give it a default, or "
            "let it be given by name",
        ),
    ],
    ids=["model-twice", "data-twice", "scalar-kwargs", "positional-only"],
)
def test_a_factory_argument_given_twice_or_that_no_key_can_give_is_refused(overrides, refusal):
    with pytest.raises(UsageError) as refused:
        config.load(None, overrides)
    assert str(refused.value) == refusal
    same = config.load(None, ["model._target_=factories.classifier", "model.dropout=0.3", "model.kwargs.dropout=0.3"])
    assert same.model.kwargs == {"dropout": 0.3}


@pytest.mark.parametrize(("key", "expected"), [("output_dir", "a folder's path"), ("trainer.resume", "auto, none or")])
def test_an_empty_path_is_refused_not_taken_for_this_folder(key, expected):
    with pytest.raises(UsageError, match=f"^config key '{key}' has invalid value '': expected {expected}"):
        config.load(None, [f"{key}=''"])


def test_a_factory_argument_from_a_later_layer_wins_whichever_way_each_layer_spells_it(tmp_path):
    # The file's value beside _target_ overwrote the override's under kwargs (and the other way round), silently.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  _target_: factories.classifier\n  dropout: 0.1\n  kwargs:\n    features: 8\n")
    for overrides in (["model.kwargs.dropout=0.3"], ["model.dropout=0.3"]):
        assert config.load(recipe, overrides).model.kwargs == {"features": 8, "dropout": 0.3}
    assert config.load(recipe, ["model.features=4"]).model.kwargs == {"features": 4, "dropout": 0.1}
    cfg = config.load(recipe, ["model.kwargs.dropout=0.3"])
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml(cfg))
    assert config.load(saved) == cfg  # the value that won is the one saved
    nested = tmp_path / "nested.yaml"
    nested.write_text("model:\n  _target_: factories.AnyOptions\n  kwargs:\n    opts: {a: 1, b: 1}\n")
    assert config.load(nested, ["model.opts.b=2"]).model.kwargs == {"opts": {"a": 1, "b": 2}}  # a section merges


@pytest.mark.parametrize(("override", "section"), [("model.kwargs.width=3", "model"), ("data.kwargs.path=/x", "data")])
def test_kwargs_without_a_factory_are_refused_not_dropped(override, section):
    # The built-in MLP and digits would have trained, the key recorded in config.yaml as if it had been used.
    with pytest.raises(UsageError) as raised:
        config.load("configs/digits_mlp.yaml", [override])
    assert str(raised.value) == (
        f"config key '{override.split('=')[0]}' does nothing: {section}.kwargs are the keyword arguments of a "
        f"{section}._target_ factory, and none is set"
    )


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["model._target_=factories.small_net", "model.dropout=0.5"], "'model.dropout'"),
        (["model._target_=factories.small_net", "model.num_classes=3"], "'model.num_classes'"),
        (["model._target_=factories.small_net", "model.name=cnn"], "'model.name'"),
        (["model._target_=factories.small_net", "model.hidden_sizes=[16]"], "'model.hidden_sizes'"),
        (["data._target_=factories.blobs", "data.root=/datasets/mine"], "'data.root'"),
        (["data._target_=factories.blobs", "data.val_fraction=0.5"], "'data.val_fraction'"),
        (["data._target_=factories.blobs", "data.synthetic.train_size=10"], "'data.synthetic'"),
    ],
)
def test_built_in_only_key_the_factory_does_not_take_is_refused(overrides, named):
    with pytest.raises(UsageError, match="only applies to the built-in") as raised:
        config.load(None, overrides)
    message = str(raised.value)
    assert named in message and overrides[0].split("=")[1] in message
    assert "\n" not in message


def test_built_in_only_key_is_refused_by_the_cli_in_one_line(tmp_path, capsys):
    output_dir = tmp_path / "run"
    args = ["model._target_=factories.small_net", "model.dropout=0.5", "trainer.device=cpu", f"output_dir={output_dir}"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error == (
        "ddp-train: error: config key 'model.dropout' is not a parameter of factories.small_net "
        "(it takes features, hidden, classes) and only applies to the built-in models\n"
    )
    assert not output_dir.exists()


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (
            ["data.synthetic.train_size=1000000000000"],
            "data.synthetic (train_size, val_size, input_shape, num_classes)",
        ),
        (["data.synthetic.input_shape=[9223372036854775807]"], "data.synthetic (train_size, val_size, input_shape"),
        (
            ["model.name=mlp", "model.hidden_sizes=[10000000000000]"],
            "model.hidden_sizes, inputs of shape [3, 32, 32]: too",
        ),
        (
            ["model.name=cnn", "model.num_classes=10000000000000"],
            "model.num_classes, inputs of shape [3, 32, 32]: too large",
        ),
    ],
)
def test_sizes_past_this_machines_memory_are_named_in_one_line(tmp_path, capsys, overrides, said):
    # Sizes past any address space (so no overcommit setting lets them through): each was torch's traceback,
    # "DefaultCPUAllocator: can't allocate memory".
    output_dir = tmp_path / "run"
    assert main(["data.name=synthetic", *overrides, "trainer.device=cpu", f"output_dir={output_dir}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"ddp-train: error: {said}") and error.count("\n") == 1
    assert not output_dir.exists()


def test_a_validation_fraction_that_leaves_no_digit_is_named_in_one_line(tmp_path, capsys):
    output_dir = tmp_path / "run"
    assert main(["data.val_fraction=0.0002", "trainer.device=cpu", f"output_dir={output_dir}"]) == 2
    assert capsys.readouterr().err == (
        "ddp-train: error: config key 'data.val_fraction' = 0.0002 leaves none of the 1797 digits for validation\n"
    )
    assert main(["data.val_fraction=0.9999", "trainer.device=cpu", f"output_dir={output_dir}"]) == 2
    assert capsys.readouterr().err == (
        "ddp-train: error: config key 'data.val_fraction' = 0.9999 leaves none of the 1797 digits for training\n"
    )
    assert not output_dir.exists()


FACTORY_RUN = [
    "data._target_=factories.folder_blobs",
    "data.root=/datasets/mine",
    "data.batch_size=8",
    "model._target_=factories.classifier",
    "model.dropout=0.25",
    "model.features=8",
]


def test_saved_factory_config_loads_back_identically(tmp_path):
    cfg = config.load(None, FACTORY_RUN)
    assert config.from_container(config.to_container(cfg)) == cfg  # a checkpoint's config
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml(cfg))
    assert config.load(saved) == cfg  # the run's config.yaml, given again as --config
    assert "hidden_sizes" not in saved.read_text()  # keys that reached nothing are not saved as if they had


def test_a_schema_key_written_under_kwargs_alone_loads_back_with_its_value(tmp_path):
    recipe, saved = tmp_path / "own.yaml", tmp_path / "config.yaml"
    recipe.write_text("model:\n  _target_: factories.classifier\n  kwargs:\n    dropout: 0.5\n")
    cfg = config.load(recipe)
    saved.write_text(config.to_yaml(cfg))
    reloaded = config.load(saved)  # before: the schema's dropout 0.0, saved beside _target_, replaced the 0.5
    assert reloaded == cfg
    dropout, _ = models.build(reloaded.model, (8,), dataset_classes=3)
    assert dropout.p == 0.5


def test_checkpoint_config_with_every_schema_key_loads_and_takes_overrides():
    cfg = config.load(None, FACTORY_RUN)
    every_key = dataclasses.asdict(cfg)  # as older checkpoints saved it: unused schema keys at their defaults
    assert config.from_container(every_key) == cfg
    overridden = config.from_container(every_key, ["model.dropout=0.5"])
    assert overridden.model.kwargs == {"features": 8, "dropout": 0.5}


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = config.load(CONFIGS / "cifar10_resnet18.yaml", ["seed=3"])
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml(cfg))
    assert config.load(saved) == cfg


def test_array_tasks_of_one_command_write_apart_and_a_requeued_task_resumes_its_own_folder(
    tmp_path, capsys, monkeypatch
):
    args = ["data._target_=factories.blobs", "model._target_=factories.small_net", "trainer.device=cpu"]
    args += ["trainer.epochs=1", f"output_dir={tmp_path}"]
    for task in ("0", "1", "0"):  # task 0 again, as SLURM requeues it: same command, same SLURM_ARRAY_TASK_ID
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        assert main(args) == 0
    said = capsys.readouterr().out
    assert f"SLURM array task 1: output_dir {tmp_path / 'array_task_1'}" in said
    assert said.count(f"resumed from {tmp_path / 'array_task_0' / 'checkpoints' / 'last.pt'}") == 1
    assert [len(read_metrics(tmp_path / f"array_task_{task}")) for task in (0, 1)] == [1, 1]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_array_task_refuses_to_start_over_beside_checkpoints_saved_in_output_dir(tmp_path, capsys, monkeypatch):
    # Releases before the per-task folders saved each task's checkpoints in output_dir itself.
    args = ["data._target_=factories.blobs", "model._target_=factories.small_net", "trainer.device=cpu"]
    args += ["trainer.epochs=1", f"output_dir={tmp_path}"]
    assert main(args) == 0
    saved = {path: path.read_bytes() for path in (tmp_path / "checkpoints").iterdir()}
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    capsys.readouterr()
    assert main([*args, "trainer.epochs=2", "trainer.allow_changes=[trainer.epochs]"]) == 2
    assert capsys.readouterr().err == (
        f"ddp-train: error: output_dir {tmp_path} holds checkpoints of a run not split per array task (a release "
        "before array_task_<index> folders, or a run outside the array): to resume it, set "
        "output_dir_per_array_task=false; to train array task 3 anew, use another output_dir\n"
    )
    assert not (tmp_path / "array_task_3").exists()
    assert {path: path.read_bytes() for path in (tmp_path / "checkpoints").iterdir()} == saved
    more = [*args, "trainer.epochs=2", "trainer.allow_changes=[trainer.epochs]", "output_dir_per_array_task=false"]
    assert main(more) == 0
    assert [line["epoch"] for line in read_metrics(tmp_path)] == [1, 2]


def test_an_array_tasks_saved_config_runs_in_its_folder_again(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml(api.for_array_task(config.load(None, [f"output_dir={tmp_path}"]), 3)))
    # before: output_dir/array_task_3/array_task_3
    assert api.for_array_task(config.load(saved), 3).output_dir == str(tmp_path / "array_task_3")


def test_output_dir_per_array_task_false_keeps_output_dir_as_written():
    cfg = config.load(None, ["output_dir=runs/sweep_3", "output_dir_per_array_task=false"])
    assert api.for_array_task(cfg, 3).output_dir == "runs/sweep_3"


def test_a_malformed_array_task_id_is_named_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4294967294x")
    assert main(["trainer.device=cpu", f"output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == (
        "ddp-train: error: environment variable SLURM_ARRAY_TASK_ID='4294967294x' is not an integer\n"
    )


@pytest.fixture
def home(tmp_path, monkeypatch):
    """HOME set to a fresh folder, and the working directory elsewhere: a literal ./~ folder would show there."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


def test_home_is_expanded_in_output_dir_and_resume_from_yaml_and_dotted_overrides(home, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: ~/runs/x\n")
    cfg = config.load(recipe, ["trainer.resume=~/ck.pt"])  # bash leaves a ~ after `trainer.resume=` as it is
    assert (cfg.output_dir, cfg.trainer.resume) == (f"{home}/runs/x", f"{home}/ck.pt")
    assert f"output_dir: {home}/runs/x" in config.to_yaml(cfg) and f"resume: {home}/ck.pt" in config.to_yaml(cfg)
    assert config.load_for_objects(None, ["output_dir=~/y"]).output_dir == f"{home}/y"  # fit(overrides=...)
    assert config.from_container({"output_dir": "~/z"}).output_dir == f"{home}/z"


@pytest.mark.parametrize("resume", ["auto", "none"])
def test_resume_keywords_are_kept_as_written(home, resume):
    assert config.load(None, [f"trainer.resume={resume}"]).trainer.resume == resume


def test_a_run_into_a_home_relative_output_dir_writes_there_and_saves_the_expanded_path(home, tmp_path):
    args = ["data._target_=factories.blobs", "model._target_=factories.small_net", "trainer.device=cpu"]
    assert main([*args, "trainer.epochs=1", "output_dir=~/run"]) == 0
    assert len(read_metrics(home / "run")) == 1
    assert config.load(home / "run" / "config.yaml").output_dir == str(home / "run")
    assert not (tmp_path / "~").exists()
