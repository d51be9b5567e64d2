"""The monitored metric: best epoch by mode and min_delta, patience counted in whole epochs, state round trip."""

from __future__ import annotations

from ddp_trainer import config
from ddp_trainer.monitor import Monitor, build_monitor
from ddp_trainer.tasks import Classification


def feed(monitor: Monitor, values: list[float]) -> list[bool]:
    return [monitor.update({"val/loss": value}, whole_epoch=True) for value in values]


def test_min_mode_keeps_the_lowest_and_ignores_changes_within_min_delta():
    monitor = Monitor("val/loss", "min", min_delta=0.1, patience=0)
    assert feed(monitor, [1.0, 0.95, 0.8, 0.85]) == [True, True, True, False]  # best.pt takes any better epoch
    assert monitor.best == 0.8 and monitor.stale_epochs == 1  # 0.95 was within min_delta of 1.0; 0.8 was not
    assert not monitor.should_stop()  # patience 0: never


def test_min_delta_ends_the_run_while_best_pt_still_takes_each_better_epoch():
    # As Lightning's EarlyStopping and ModelCheckpoint: the threshold is for stopping; best.pt held epoch 1 here.
    monitor = Monitor("val/accuracy", "max", min_delta=0.02, patience=2)
    values = [0.90, 0.91, 0.915]
    assert [monitor.update({"val/accuracy": value}, whole_epoch=True) for value in values] == [True, True, True]
    assert monitor.should_stop() and monitor.best == 0.915
    assert monitor.why_stop() == (
        "val/accuracy has not improved on 0.9000 by more than 0.02 for 2 epochs (best val/accuracy 0.9150)"
    )
    restored = Monitor("val/accuracy", "max", min_delta=0.02, patience=3)
    restored.load_state_dict(monitor.state_dict())
    assert not restored.update({"val/accuracy": 0.912}, whole_epoch=True) and restored.should_stop()  # 3 stale
    assert restored.update({"val/accuracy": 0.921}, whole_epoch=True) and restored.stale_epochs == 0  # 0.90 + 0.02


def test_patience_counts_whole_epochs_only():
    monitor = Monitor("val/loss", "max", min_delta=0.0, patience=2)
    feed(monitor, [0.5, 0.4])
    assert not monitor.update({"val/loss": 0.3}, whole_epoch=False) and not monitor.should_stop()
    feed(monitor, [0.45])
    assert monitor.should_stop() and monitor.stale_epochs == 2


def test_a_part_epoch_changes_nothing_a_resumed_run_would_judge_differently():
    # Stopped at max_steps, a part epoch is validated; resumed, the same epoch is validated whole. Were the part's
    # value the best, the whole epoch would be judged against it, and best.pt, patience and early stopping differ.
    monitor = Monitor("val/loss", "min", min_delta=0.0, patience=1)
    assert monitor.update({"val/loss": 0.9}, whole_epoch=False)  # no whole epoch yet: best.pt takes it for now
    assert monitor.best is None
    feed(monitor, [0.8])
    assert not monitor.update({"val/loss": 0.1}, whole_epoch=False)
    assert (monitor.best, monitor.stale_epochs, monitor.should_stop()) == (0.8, 0, False)
    assert feed(monitor, [0.7]) == [True]


def test_state_round_trips_through_checkpoint_keys():
    monitor = Monitor("val/loss", "min", min_delta=0.0, patience=3)
    feed(monitor, [0.7, 0.9])
    restored = Monitor("val/loss", "min", min_delta=0.0, patience=3)
    restored.load_state_dict(monitor.state_dict())
    assert (restored.best, restored.stale_epochs) == (0.7, 1)


def test_the_last_line_names_the_part_epoch_value_that_best_pt_holds():
    monitor = Monitor("val/loss", "min", min_delta=0.0, patience=0)
    assert monitor.describe() == "best val/loss n/a"
    monitor.update({"val/loss": 0.9}, whole_epoch=False)
    assert monitor.describe() == "best val/loss 0.9000 (part epoch)"
    started_again = Monitor("val/loss", "min", min_delta=0.0, patience=0)  # the finished run, from its checkpoint
    started_again.load_state_dict(monitor.state_dict())
    assert started_again.describe() == "best val/loss 0.9000 (part epoch)"
    feed(monitor, [0.95])
    assert monitor.describe() == "best val/loss 0.9500"


def test_a_nan_value_is_never_the_best_and_counts_as_a_stale_epoch():
    # A NaN (an IoU of 0/0 on one batch) compared as neither better nor worse: taken first, it held best.pt for good.
    monitor = Monitor("val/loss", "min", min_delta=0.0, patience=2)
    assert not monitor.update({"val/loss": float("nan")}, whole_epoch=False) and monitor.part_epoch_best is None
    assert feed(monitor, [float("nan"), 0.28, 0.25, float("nan")]) == [False, True, True, False]
    assert monitor.best == 0.25 and monitor.stale_epochs == 1
    only_nan = Monitor("val/loss", "min", min_delta=0.0, patience=2)
    feed(only_nan, [float("nan")] * 2)
    assert only_nan.why_stop() == "val/loss has not improved by more than 0.0 for 2 epochs (best val/loss n/a)"


def test_the_default_recipe_lets_a_monitor_set_alone_take_its_own_direction():
    # The recipe pinned mode max: checkpoint.monitor=val/loss then kept the epoch of the highest loss as best.pt.
    recipe = config.load("configs/digits_mlp.yaml", ["checkpoint.monitor=val/loss"])
    assert build_monitor(recipe, Classification(), validates=True).mode == "min"
    assert build_monitor(config.load("configs/digits_mlp.yaml"), Classification(), validates=True).mode == "max"
