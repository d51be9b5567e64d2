"""The command line: one-line errors with exit code 2, user factories, help."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_DIR, cli_env, read_metrics

from ddp_trainer.train import main


def test_misspelt_key_exits_2_with_one_line_naming_it(tmp_path, capsys):
    assert main(["--config", "configs/digits_mlp.yaml", f"output_dir={tmp_path}", "trainer.epochz=3"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "'trainer.epochz'" in error
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_missing_config_file_exits_2(capsys):
    assert main(["--config", "configs/nope.yaml"]) == 2
    assert "configs/nope.yaml does not exist" in capsys.readouterr().err


def test_user_dataset_and_model_factories_train(tmp_path):
    args = ["data._target_=factories.blobs", "data.val_size=41", "model._target_=factories.small_net", "model.hidden=4"]
    options = ["trainer.epochs=3", "trainer.device=cpu", "data.batch_size=8", "optim.lr=0.02"]
    assert main([*args, *options, f"output_dir={tmp_path}"]) == 0
    lines = read_metrics(tmp_path)
    assert [line["val/samples"] for line in lines] == [41, 41, 41]
    assert lines[-1]["val/accuracy"] > 0.8


def test_factory_returning_the_wrong_thing_is_named(tmp_path, capsys):
    assert main(["model._target_=factories.blobs", f"output_dir={tmp_path}", "trainer.device=cpu"]) == 2
    assert "model._target_=factories.blobs returned tuple, not an nn.Module" in capsys.readouterr().err


def test_module_entry_point_prints_help():
    result = subprocess.run(
        [sys.executable, "-m", "ddp_trainer.train", "--help"],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO_DIR,
    )
    assert result.returncode == 0
    assert "key=value" in result.stdout
