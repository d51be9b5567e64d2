"""Tasks: exact sums for each built-in task, batches of any layout, and a user's own task through fit()."""

from __future__ import annotations

import collections
import dataclasses
import math
import random
import re
import signal
import threading
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, TensorDataset

import ddp_trainer
from ddp_trainer import checkpoint
from ddp_trainer.cli.evaluate import LOAD_WEIGHTS
from ddp_trainer.cli.train import main
from ddp_trainer.data import to_device
from ddp_trainer.errors import UsageError
from ddp_trainer.monitor import metric_names
from ddp_trainer.task_checks import resolve
from ddp_trainer.tasks import Classification, LanguageModel, Regression, training_measure

CPU = ["trainer.device=cpu", "trainer.progress_bar=false"]


def test_regression_sums_give_exact_mse_and_mae_whatever_the_split():
    model = nn.Identity()
    predictions, targets = torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([0.0, 2.0, 1.0])
    task = Regression()
    loss, whole = task.forward(model, (predictions, targets))
    parts = [
        task.forward(model, (predictions[:1], targets[:1]))[1],
        task.forward(model, (predictions[1:], targets[1:]))[1],
    ]
    torch.testing.assert_close(parts[0] + parts[1], whole)  # (B, 1) predictions against (B,) targets: no broadcast
    metrics = task.summarize(dict(zip(task.sum_names, whole.tolist(), strict=True)), "val")
    assert metrics == pytest.approx({"val/loss": 10 / 3, "val/mse": 10 / 3, "val/mae": 4 / 3, "val/samples": 3})
    assert loss.item() == pytest.approx(10 / 3)


def test_language_model_counts_tokens_not_padding_and_reports_perplexity():
    vocabulary = 5
    model = nn.Embedding(vocabulary, vocabulary)  # logits for every position
    tokens = torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1]])
    task = LanguageModel()
    loss, sums = task.forward(model, tokens)
    totals = dict(zip(task.sum_names, sums.tolist(), strict=True))
    assert totals["tokens"] == 6 and totals["samples"] == 2  # 2 sequences of 3 next-token targets
    metrics = task.summarize(totals, "val")
    assert metrics["val/loss"] == pytest.approx(loss.item()) and metrics["val/perplexity"] == pytest.approx(
        math.exp(loss.item())
    )
    padded = (tokens[:, :-1], torch.tensor([[1, 2, -100], [3, -100, -100]]))
    assert dict(zip(task.sum_names, task.forward(model, padded)[1].tolist(), strict=True))["tokens"] == 3


def test_language_model_pads_sequences_of_different_lengths_and_sums_them_as_if_one_by_one():
    task, model = LanguageModel(), nn.Embedding(6, 6)
    sequences = [torch.tensor([1, 2, 3, 4, 5]), torch.tensor([5, 4]), torch.tensor([0, 1, 2])]
    inputs, targets = task.collate(sequences)
    assert inputs.tolist() == [[1, 2, 3, 4], [5, 0, 0, 0], [0, 1, 0, 0]]
    assert targets.tolist() == [[2, 3, 4, 5], [4, -100, -100, -100], [1, 2, -100, -100]]
    one_by_one = sum(task.forward(model, sequence.view(1, -1))[1] for sequence in sequences)
    padded = task.forward(model, (inputs, targets))[1]  # (loss x tokens, tokens, seqs), in float64
    torch.testing.assert_close(padded, one_by_one, rtol=1.3e-6, atol=1e-5)  # losses summed in float32, in other orders
    pairs = [(sequence[:-1], sequence[1:]) for sequence in sequences]  # the (inputs, targets) layout pads alike
    assert all(torch.equal(a, b) for a, b in zip(task.collate(pairs), (inputs, targets), strict=True))
    assert task.collate([sequences[0], sequences[0]]).shape == (2, 5)  # one length: the samples' own layout
    numpy = [sequence.numpy().astype("uint16") for sequence in sequences]  # token ids as tokenizers store them
    for layout in (numpy, [{"inputs": a, "targets": b} for a, b in pairs]):
        assert [part.tolist() for part in task.collate(layout)] == [inputs.tolist(), targets.tolist()]
    # uint16 ids reach the model as int64, which nn.Embedding takes: padded, and as one length in their own layout.
    torch.testing.assert_close(task.forward(model, task.collate(numpy))[1], padded)
    same_length = task.collate([numpy[0], numpy[0]])
    assert same_length.dtype == torch.uint16  # the loader's batch is left as it is; the task reads it as ids
    twice = task.forward(model, sequences[0].repeat(2, 1))[1]
    torch.testing.assert_close(task.forward(model, same_length)[1], twice)


class RaggedStream(torch.utils.data.IterableDataset):
    """Sentences of 3 to 8 tokens, as a text file gives them: no two batches need be the same length."""

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for length in range(3, 9):
            yield torch.randint(0, 6, (length,), generator=generator)


def test_fit_trains_a_language_model_on_sentences_of_different_lengths(tmp_path):
    val = [torch.arange(length) % 6 for length in range(2, 7)]
    model = nn.Sequential(nn.Embedding(6, 8), nn.Linear(8, 6))
    overrides = [*CPU, "trainer.epochs=1", "data.batch_size=3", f"output_dir={tmp_path}"]
    record = ddp_trainer.fit(model, RaggedStream(), val, task="language_model", overrides=overrides)
    assert (record["train/samples"], record["val/samples"]) == (6, 5)
    tokens = sum(length - 1 for length in range(2, 7))
    with torch.no_grad():
        loss_sum = sum(F.cross_entropy(model(row[:-1]), row[1:], reduction="sum") for row in val)
    assert record["val/loss"] == pytest.approx(loss_sum.item() / tokens)  # padding counted nowhere


def test_a_language_model_on_images_and_labels_is_refused_in_one_line(tmp_path, capsys):
    # task=language_model on the digits: pad_sequence's "ArrayRef: invalid slice" traceback, in training and evaluate.
    assert main([*CPU, "task=language_model", "trainer.max_steps=1", f"output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == (
        "ddp-train: error: task=language_model pads sequences of token ids (or pairs of them, of one length), not "
        "inputs of shape (1, 8, 8) with targets of shape ()\n"
    )


def test_a_language_model_validation_of_padding_alone_is_refused_not_scored_perfect(tmp_path):
    train, val = [torch.arange(5) % 6] * 4, [(torch.arange(4), torch.full((4,), -100))]
    model = nn.Sequential(nn.Embedding(6, 8), nn.Linear(8, 6))
    overrides = [*CPU, "trainer.epochs=1", "data.batch_size=2", f"output_dir={tmp_path}"]
    # Before: val/loss 0 and val/perplexity 1, which best.pt took.
    with pytest.raises(UsageError, match=r"^data: every target of the validation data is -100 \(ignored\)"):
        ddp_trainer.fit(model, train, val, task="language_model", overrides=overrides)
    assert not (tmp_path / "checkpoints" / "best.pt").exists()


def test_a_language_model_batch_of_padding_alone_adds_nothing_instead_of_a_nan():
    model = nn.Embedding(5, 5)
    loss, sums = LanguageModel().forward(model, (torch.tensor([[0, 1]]), torch.full((1, 2), -100)))
    assert loss.item() == 0 and sums.tolist() == [0.0, 0.0, 1.0]  # (loss x tokens, tokens, sequences)
    loss.backward()  # a finite step that changes nothing, where cross_entropy's mean gave 0 / 0
    assert not model.weight.grad.any()


@pytest.mark.parametrize(
    ("outputs", "targets"),
    [
        (torch.zeros(4, 3, 5), torch.zeros(4, 5, dtype=torch.long)),  # per position: each would count as a sample
        (torch.zeros(4, 3), torch.zeros(4)),  # float labels
        (torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long)),  # a column of labels
    ],
    ids=["per-position", "float", "column"],
)
def test_classification_names_targets_it_would_miscount(outputs, targets):
    shapes = re.escape(f"the model gave {tuple(outputs.shape)} for targets of {tuple(targets.shape)} ({targets.dtype})")
    with pytest.raises(UsageError, match=f"^classification: {shapes}; it needs \\(batch, classes\\) logits"):
        Classification().forward(nn.Identity(), (outputs, targets))


class Returns(nn.Module):
    """A model whose output is fixed: what a task makes of it is all that is tested."""

    def __init__(self, output: object) -> None:
        super().__init__()
        self.output = output

    def forward(self, inputs: torch.Tensor) -> object:
        return self.output


@pytest.mark.parametrize("name", ["classification", "regression", "language_model"])
@pytest.mark.parametrize(
    ("output", "described"),
    [((torch.zeros(4, 3), torch.zeros(4)), "a tuple of 2"), ({"logits": torch.zeros(4, 3)}, "a dict with keys")],
    ids=["tuple", "dict"],
)
def test_a_built_in_task_names_a_model_output_that_is_not_a_tensor(name, output, described):
    batch = (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(
        UsageError, match=f"^{name}: the model returned {described}.*, not a tensor; pass a task object"
    ):
        resolve(name).forward(Returns(output), batch)


def sums_by_hand(task: Classification | LanguageModel, batch: tuple, loss: torch.Tensor) -> torch.Tensor:
    """The sums one step made on its own before they were deferred: (loss x count, counted, samples)."""
    outputs, targets = batch
    samples = torch.tensor(float(len(targets)), dtype=torch.float64)
    if isinstance(task, Classification):
        correct = (outputs.argmax(dim=1) == targets).sum(dtype=torch.float64)
        return torch.stack([loss * samples, correct, samples])
    tokens = (targets != task.ignore_index).sum(dtype=torch.float64)
    return torch.stack([loss * tokens, tokens, samples])


@pytest.mark.parametrize("sizes", [(7, 7, 7), (7, 3, 7)])  # a log interval of equal batches, and the epoch's last
@pytest.mark.parametrize("task", [Classification(), LanguageModel()], ids=["classification", "language_model"])
def test_a_log_intervals_deferred_sums_equal_each_steps_own_bit_for_bit(task, sizes):
    # A training step keeps its loss and a bool tensor; the host sync makes the rows. Each row must have the bits
    # of the sums that step would have made on its own, and of forward's (validation): else the metrics would drift.
    generator = torch.Generator().manual_seed(0)
    if isinstance(task, Classification):
        model = nn.Identity()  # the inputs are the logits
        batches = [(torch.randn(n, 4, generator=generator), torch.randint(4, (n,), generator=generator)) for n in sizes]
    else:
        model = nn.Embedding(5, 5)
        batches = []
        for n in sizes:
            targets = torch.randint(-1, 5, (n, 6), generator=generator)  # -1 becomes padding
            batches.append((torch.randint(5, (n, 6), generator=generator), targets.masked_fill(targets < 0, -100)))
    steps = [task.step_outputs(model, batch) for batch in batches]
    rows = task.sums_of(torch.stack([loss.detach() for loss, _ in steps]), [outputs for _, outputs in steps])
    for row, batch, (loss, _) in zip(rows, batches, steps, strict=True):
        logits_batch = (model(batch[0]), batch[1])
        assert torch.equal(row, sums_by_hand(task, logits_batch, loss.detach()))
        assert torch.equal(row, task.forward(model, batch)[1])
    assert rows.dtype == torch.float64 and rows[:, -1].tolist() == list(map(float, sizes))
    assert isinstance(task, Classification) or 0 < rows[:, 1].sum() < 6 * sum(sizes)  # some padding was left out


def test_batches_of_tuples_and_dicts_move_to_the_device_at_any_depth():
    batch = {"inputs": (torch.zeros(2, 3, 4, 4), [torch.ones(2)]), "targets": torch.tensor([0, 1]), "name": "x"}
    moved = to_device(batch, torch.device("meta"), channels_last=True)
    assert moved["inputs"][0].device.type == "meta" and moved["inputs"][1][0].device.type == "meta"
    assert moved["inputs"][0].is_contiguous(memory_format=torch.channels_last)
    assert moved["targets"].device.type == "meta" and moved["name"] == "x" and isinstance(moved["inputs"], tuple)
    Pair = collections.namedtuple("Pair", ["x", "y"])  # a dataset's namedtuple: type(batch)(generator) raised
    pair = to_device([Pair(torch.zeros(2), torch.ones(2))], torch.device("meta"), channels_last=False)[0]
    assert type(pair) is Pair and pair.x.device.type == "meta" and pair.y.device.type == "meta"


@dataclasses.dataclass(frozen=True)
class Tokens:
    """A task's own collate's batch: a dataclass of tensors, with a field the constructor does not take."""

    ids: torch.Tensor
    lengths: list[int]
    mask: torch.Tensor = dataclasses.field(init=False)
    weights: torch.Tensor = dataclasses.field(init=False, default_factory=lambda: torch.ones(1))

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask", self.ids != 0)


class Graph:
    """A batch type with a `.to` of its own, as a graph library's are."""

    def __init__(self, edges: torch.Tensor) -> None:
        self.edges = edges

    def to(self, device: torch.device) -> Graph:
        return Graph(self.edges.to(device))


def test_dataclass_batches_and_batches_with_their_own_to_move_to_the_device():
    # Returned as they were, their tensors stayed on the CPU: a task's collate may make them (a GPU run failed).
    tokens = to_device(Tokens(torch.tensor([[3, 0]]), [1]), torch.device("meta"), channels_last=False)
    assert tokens.ids.device.type == "meta" and tokens.mask.device.type == "meta" and tokens.lengths == [1]
    assert tokens.weights.device.type == "meta"  # not given to __init__, nor made from what was
    graph = to_device({"graph": Graph(torch.zeros(2, 5))}, torch.device("meta"), channels_last=False)["graph"]
    assert isinstance(graph, Graph) and graph.edges.device.type == "meta"


def test_a_dict_batch_and_a_pair_give_the_same_classification_sums_and_labels_of_any_integer_type_too():
    model = nn.Linear(4, 3)
    inputs, targets = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    sums = Classification().forward(model, (inputs, targets))[1]
    assert torch.equal(Classification().forward(model, {"inputs": inputs, "targets": targets})[1], sums)
    for labels in (torch.int32, torch.uint8):  # int32: torch.from_numpy of a label array; cross_entropy refused it
        assert torch.equal(Classification().forward(model, (inputs, targets.to(labels)))[1], sums)


def test_a_batch_of_another_layout_names_what_it_is():
    with pytest.raises(UsageError, match="a dict with keys \\['x', 'y'\\]"):
        Classification().forward(nn.Identity(), {"x": torch.zeros(1), "y": torch.zeros(1)})


def test_a_label_past_the_models_outputs_is_named_in_one_line(tmp_path, capsys):
    args = [*CPU, "data._target_=factories.blobs", "data.classes=5", "model._target_=factories.small_net"]
    assert main([*args, f"output_dir={tmp_path}"]) == 2  # was cross_entropy's IndexError traceback, exit 1
    assert re.fullmatch(
        r"ddp-train: error: classification: a target is no class of the model's 3 outputs \(Target [34] is out of "
        r"bounds\.\): labels run from 0 to model.num_classes - 1; set model.num_classes, or check the data's labels\n",
        capsys.readouterr().err,
    )


class Ranking:
    """A user's own task: margin loss on (query, positive, negative) triples, reporting how often it ranks right."""

    sum_names = ("loss_sum", "ranked", "samples")
    default_monitor = "val/ranked"
    higher_is_better = ("ranked",)

    def forward(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean margin loss, and (loss x samples, correctly ranked triples, samples)."""
        query, positive, negative = (model(batch[key]) for key in ("query", "positive", "negative"))
        good, bad = (query * positive).sum(1), (query * negative).sum(1)
        loss = torch.relu(1 - good + bad).mean()
        samples = torch.full((), float(len(good)), dtype=torch.float64, device=good.device)  # no device=: CPU only
        return loss, torch.stack([loss.detach().double() * samples, (good > bad).sum(dtype=torch.float64), samples])

    def summarize(self, totals: dict[str, float], prefix: str) -> dict[str, float | int]:
        """`prefix/loss`, `prefix/ranked`, `prefix/samples`."""
        samples = totals["samples"] or float("nan")  # no sample (every step skipped): no mean, not a perfect 0
        return {
            f"{prefix}/loss": totals["loss_sum"] / samples,
            f"{prefix}/ranked": totals["ranked"] / samples,
            f"{prefix}/samples": int(totals["samples"]),
        }


class Triples(Dataset):
    """Dict samples: a query, a noisy copy of it (positive) and an unrelated vector (negative)."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.query = torch.randn(count, 6, generator=generator)
        self.positive = self.query + 0.3 * torch.randn(count, 6, generator=generator)
        self.negative = torch.randn(count, 6, generator=generator)

    def __len__(self) -> int:
        return len(self.query)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"query": self.query[index], "positive": self.positive[index], "negative": self.negative[index]}


def test_fit_runs_a_users_task_on_dict_batches_and_follows_its_metric(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(6, 6)
    args = [*CPU, "trainer.epochs=4", "optim.lr=0.01", f"output_dir={tmp_path}"]
    record = ddp_trainer.fit(model, Triples(96, 1), Triples(40, 2), task=Ranking(), overrides=args)
    lines = read_metrics(tmp_path)
    assert record == lines[-1] and record["val/samples"] == 40 and record["train/samples"] == 96
    best = checkpoint.load(tmp_path / "checkpoints" / "best.pt")
    assert best["best_metric"] == max(line["val/ranked"] for line in lines)  # maximised: the task says so
    assert (tmp_path / "config.yaml").read_text().count("task: Ranking") == 1


def test_monitor_takes_any_metric_the_task_reports_and_refuses_others(tmp_path):
    data = TensorDataset(torch.randn(64, 3), torch.randn(64))
    val = TensorDataset(torch.randn(20, 3), torch.randn(20))
    args = [*CPU, "trainer.epochs=3", "checkpoint.monitor=val/mae", f"output_dir={tmp_path / 'mae'}"]
    ddp_trainer.fit(nn.Linear(3, 1), data, val, task="regression", overrides=args)
    lines = read_metrics(tmp_path / "mae")
    assert checkpoint.load(tmp_path / "mae" / "checkpoints" / "best.pt")["best_metric"] == min(
        line["val/mae"] for line in lines
    )  # min: only accuracies are maximised by default
    wrong = [*CPU, "checkpoint.monitor=val/accuracy", f"output_dir={tmp_path / 'wrong'}"]
    with pytest.raises(
        UsageError, match="checkpoint.monitor=val/accuracy is not a metric of this run: one of train/loss"
    ):
        ddp_trainer.fit(nn.Linear(3, 1), data, val, task="regression", overrides=wrong)


def test_built_in_tasks_name_their_metrics_and_unknown_ones_are_refused():
    assert metric_names(resolve("language_model"), "val") == ["val/loss", "val/perplexity", "val/samples"]
    with pytest.raises(UsageError, match="task 'segmentation' is not one of classification, regression"):
        resolve("segmentation")

    class NoSums:
        default_monitor = "val/loss"

    with pytest.raises(UsageError, match="task NoSums lacks sum_names, forward, summarize"):
        resolve(NoSums())

    class HalfDeferred(Regression):
        def step_outputs(self, model, batch):
            return self.forward(model, batch)

    with pytest.raises(UsageError, match="task HalfDeferred must define both step_outputs and sums_of, or neither"):
        resolve(HalfDeferred())


class Unprefixed(Ranking):
    def summarize(self, totals: dict[str, float], prefix: str) -> dict[str, float | int]:
        return {key.removeprefix(f"{prefix}/"): value for key, value in super().summarize(totals, prefix).items()}


class TwoSums(Ranking):
    def forward(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        loss, sums = super().forward(model, batch)
        return loss, sums[:2]


class OddLoss(Ranking):
    """A loss given as a float (`.item()`), per sample, or detached, or sums on another device than the loss's."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def forward(self, model: nn.Module, batch: dict) -> tuple[Any, torch.Tensor]:
        loss, sums = super().forward(model, batch)
        if self.kind == "sums elsewhere":  # meta stands for the CPU beside a CUDA loss: failed only on a GPU
            return loss, sums.to("meta")
        odd = {"float": loss.item(), "per sample": loss.expand(4), "detached": loss.detach()}[self.kind]
        return odd, sums


class TensorMetrics(Ranking):
    def summarize(self, totals: dict[str, float], prefix: str) -> dict[str, float | int]:
        return {key: torch.tensor(value) for key, value in super().summarize(totals, prefix).items()}


class ShortSumsOf(Ranking):
    def step_outputs(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        loss, sums = self.forward(model, batch)
        return loss, sums

    def sums_of(self, losses: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(outputs)[:, :2]


class CpuSumsOf(ShortSumsOf):
    def sums_of(self, losses: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(outputs)  # on the CPU, whatever device the losses are on


class Flagged(Ranking):
    higher_is_better = True  # torchmetrics' spelling: a bool, not names


class Prefixed(Ranking):
    higher_is_better = ("val/ranked",)  # with the prefix: matched no metric, and val/ranked was minimised


class TakesTrainerNames(Ranking):
    sum_names = ("loss_sum", "skipped_steps", "samples")  # the trainer's own sum: its 0 replaced the task's count

    def summarize(self, totals: dict[str, float], prefix: str) -> dict[str, float | int]:
        return {f"{prefix}/loss": 1.0, f"{prefix}/samples": 1}


class ValOnlyPrefix(Ranking):
    def summarize(self, totals: dict[str, float], prefix: str) -> dict[str, float | int]:
        return {f"val/{key}": value for key, value in super().summarize(totals, "val").items()}  # ignores `prefix`


class ReadsAnUnnamedSum(Ranking):
    def summarize(self, totals: dict[str, float], prefix: str) -> dict[str, float | int]:
        return {**super().summarize(totals, prefix), f"{prefix}/recall": totals["relevant"]}


class ReportsGradNorm(Ranking):
    def summarize(self, totals: dict[str, float], prefix: str) -> dict[str, float | int]:
        return {**super().summarize(totals, prefix), f"{prefix}/grad_norm": 1.0}


class DividesByNothing(Ranking):
    def summarize(self, totals: dict[str, float], prefix: str) -> dict[str, float | int]:
        return {**super().summarize(totals, prefix), f"{prefix}/ratio": totals["ranked"] / (totals["samples"] - 1)}


class MonitorsWhatItLacks(Ranking):
    default_monitor = "val/recall"


class LossOnly(Ranking):
    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return super().forward(model, batch)[0]


def test_a_users_task_that_breaks_the_protocol_is_named_before_it_trains():
    with pytest.raises(UsageError, match=r"^task Ranking is a class; pass an instance: task=Ranking\(\)$"):
        resolve(Ranking)
    with pytest.raises(UsageError, match="task Unprefixed: summarize.* must name every metric 'train/...'.*'loss'"):
        resolve(Unprefixed())
    with pytest.raises(
        UsageError, match="^task Flagged: higher_is_better must be a tuple of metric names .* not True$"
    ):
        resolve(Flagged())
    with pytest.raises(
        UsageError, match="^task Prefixed: higher_is_better names val/ranked, not among its metrics: loss, ranked, samp"
    ):
        resolve(Prefixed())
    # Each of these gave a bare KeyError, at start-up or after the first log interval, or a silently wrong metric.
    refusals = {
        TakesTrainerNames: "sum_names may not use skipped_steps, which the trainer keeps itself",
        ValOnlyPrefix: "summarize(totals, 'train') must name every metric 'train/...', 'train/loss' and 'train/sam",
        ReadsAnUnnamedSum: "summarize(totals, 'train') reads 'relevant', which sum_names lacks",
        ReportsGradNorm: "train/skipped_steps and train/grad_norm are the trainer's own metrics",
        # A traceback from inside the check, before: its own bug, but met here first.
        DividesByNothing: "summarize(totals, 'train') failed on totals of 1.0 each (ZeroDivisionError: float division",
        MonitorsWhatItLacks: "default_monitor 'val/recall' is not among its metrics",  # blamed on checkpoint.monitor
    }
    for task, said in refusals.items():
        with pytest.raises(UsageError, match=f"^task {task.__name__}: {re.escape(said)}"):
            resolve(task())
    with pytest.raises(UsageError, match=r"^task TensorMetrics: summarize gave no plain number \(int or .* val/loss, "):
        resolve(TensorMetrics())
    batch = next(iter(DataLoader(Triples(4, 0), batch_size=4)))
    resolve(Ranking()).forward(nn.Linear(6, 6), batch)
    for task, given in (
        (TwoSums(), "loss a tensor of shape () and sums a tensor of shape (2,)"),
        (LossOnly(), "a tensor of shape ()"),
    ):
        with pytest.raises(UsageError, match=f"forward must return .*a tensor of 3 sums.*not {re.escape(given)}$"):
            resolve(task).forward(nn.Linear(6, 6), batch)
    for kind, given in (("float", "loss float and sums"), ("per sample", "loss a tensor of shape (4,) and sums")):
        with pytest.raises(UsageError, match=f"^task OddLoss: forward must return .*, not {re.escape(given)}"):
            resolve(OddLoss(kind)).forward(nn.Linear(6, 6), batch)
    with pytest.raises(UsageError, match="^task OddLoss: forward's loss is detached from the model's weights$"):
        resolve(OddLoss("detached")).forward(nn.Linear(6, 6), batch)
    with torch.no_grad():  # evaluation: no gradient to ask for
        resolve(OddLoss("detached")).forward(nn.Linear(6, 6), batch)
    elsewhere = "returned its sums on {}, not on the loss's device {}: create them there \\(device=loss.device\\)$"
    with pytest.raises(UsageError, match="^task OddLoss: forward " + elsewhere.format("meta", "cpu")):
        resolve(OddLoss("sums elsewhere")).forward(nn.Linear(6, 6), batch)
    deferred = resolve(ShortSumsOf())
    loss, outputs = deferred.step_outputs(nn.Linear(6, 6), batch)
    with pytest.raises(UsageError, match="sums_of must return a tensor of 2 rows .* of 3 sums .* not a tensor of "):
        deferred.sums_of(torch.stack([loss, loss]), [outputs, outputs])
    with pytest.raises(UsageError, match="^task CpuSumsOf: sums_of " + elsewhere.format("cpu", "meta")):
        resolve(CpuSumsOf()).sums_of(torch.stack([loss, loss]).to("meta"), [outputs, outputs])


class Smoothed(Classification):
    """A built-in task with its own loss: `forward` alone overridden, as a user would."""

    def __init__(self) -> None:
        self.training_calls = 0

    def forward(self, model: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        self.training_calls += model.training
        inputs, targets = batch
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets, label_smoothing=0.5)
        samples = torch.tensor(float(len(targets)), dtype=torch.float64)
        correct = (logits.argmax(dim=1) == targets).sum(dtype=torch.float64)
        return loss, torch.stack([loss.detach() * samples, correct, samples])


def test_a_built_in_tasks_subclass_that_overrides_forward_trains_with_it(tmp_path):
    data = TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,)))
    task, overrides = Smoothed(), [*CPU, "trainer.epochs=1", "data.batch_size=16", f"output_dir={tmp_path}"]
    ddp_trainer.fit(nn.Linear(3, 2), data, data, task=task, overrides=overrides)
    assert task.training_calls == 4  # every training step, not the parent's step_outputs (another loss)


def test_a_task_objects_own_attributes_decide_how_it_trains():
    batch, model = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), nn.Linear(3, 2)
    calls = []
    overridden = Classification()
    parent = overridden.forward
    overridden.forward = lambda model, batch: calls.append("forward") or parent(model, batch)  # its own loss, say
    composed = Classification()
    step_outputs = composed.step_outputs
    composed.step_outputs = lambda model, batch: calls.append("step_outputs") or step_outputs(model, batch)
    for task in (overridden, composed):
        training_measure(resolve(task), accumulate=1)[0](model, batch)
    assert calls == ["forward", "step_outputs"]


def test_fit_without_validation_data_writes_training_metrics_only(tmp_path):
    data = TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,)))
    record = ddp_trainer.fit(nn.Linear(3, 2), data, overrides=[*CPU, "trainer.epochs=2", f"output_dir={tmp_path}"])
    assert record["epoch"] == 2 and record["train/samples"] == 64
    assert not [key for key in record if key.startswith("val/")]
    assert checkpoint.load(tmp_path / "checkpoints" / "best.pt")["best_metric"] == min(
        line["train/loss"] for line in read_metrics(tmp_path)
    )


@pytest.mark.parametrize("model", [["model.hidden_sizes=[8]"], ["model._target_=factories.small_net"]])
def test_the_cli_trains_without_validation_and_refuses_an_empty_split_or_a_loader(tmp_path, capsys, model):
    args = [*CPU, *model, "trainer.epochs=1", f"output_dir={tmp_path / 'none'}"]
    assert main([*args, "data._target_=factories.blobs_without_validation"]) == 0  # was a TypeError traceback
    assert not [key for key in read_metrics(tmp_path / "none")[0] if key.startswith("val/")]
    capsys.readouterr()
    last = tmp_path / "none" / "checkpoints" / "last.pt"
    factories_named = [arg for arg in [*model, "data._target_=factories.blobs_without_validation"] if "_target_" in arg]
    assert main(["evaluate", "--checkpoint", str(last), *factories_named]) == 2
    assert capsys.readouterr().err.endswith(f"checkpoint {last}: its run's data has no validation split to evaluate\n")
    output = tmp_path / "train.jsonl"  # predict on the training split needs none: it was refused with that line
    assert (
        main(["predict", "--checkpoint", str(last), "--split", "train", "--output", str(output), *factories_named]) == 0
    )
    assert len(output.read_text().splitlines()) == 96
    empty = [*CPU, *model, "data._target_=factories.blobs", "data.val_size=0", f"output_dir={tmp_path / 'empty'}"]
    assert main(empty) == 2  # was an IndexError traceback, reading a sample to size the model
    assert capsys.readouterr().err == "ddp-train: error: data: the validation split of factories.blobs is empty\n"
    loaders = [*CPU, *model, "data._target_=factories.blob_loaders", f"output_dir={tmp_path / 'loaders'}"]
    assert main(loaders) == 2  # was a TypeError traceback, exit 1
    assert capsys.readouterr().err.startswith(
        "ddp-train: error: data: the training split of factories.blob_loaders is a DataLoader; give its dataset"
    )


def test_the_cli_refuses_an_empty_stream_it_would_size_a_built_in_model_from(tmp_path, capsys):
    streams = ["data._target_=factories.blob_streams", "data.val_size=0", "model.hidden_sizes=[8]"]
    assert main([*CPU, *streams, "model.num_classes=3", f"output_dir={tmp_path}"]) == 2  # was a StopIteration traceback
    error = "ddp-train: error: data: the validation stream yielded no sample to size the model's first layer from\n"
    assert capsys.readouterr().err == error


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_fit_leaves_the_callers_random_streams_and_signal_handlers_as_it_found_them(tmp_path):
    # A sweep's `model = Net(); fit(model, ...)` loop: each trial must start from new weights, not the same ones.
    data, model = TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,))), nn.Linear(3, 2)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = _draws(), _draws()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    first = _draws()
    ddp_trainer.fit(model, data, overrides=[*CPU, "trainer.epochs=1", f"output_dir={tmp_path / 'a'}"])
    assert (first, _draws()) == expected
    before = signal.getsignal(signal.SIGUSR2)
    with pytest.raises(UsageError, match="trainer.device"):  # a failure while joining the ranks, after the handler
        ddp_trainer.fit(nn.Linear(3, 2), data, overrides=["trainer.device=cuda:7", f"output_dir={tmp_path / 'b'}"])
    assert signal.getsignal(signal.SIGUSR2) is before


def test_fit_trains_in_a_thread_that_is_not_the_main_one_without_stop_signals(tmp_path, capsys):
    data, results = TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,))), []
    overrides = [*CPU, "trainer.epochs=2", f"output_dir={tmp_path}"]
    train = lambda: results.append(ddp_trainer.fit(nn.Linear(3, 2), data, overrides=overrides))  # noqa: E731
    worker = threading.Thread(target=train)
    worker.start()
    worker.join()
    assert [record["epoch"] for record in results] == [2]
    assert "not in the main thread: SIGTERM and SLURM's USR2 are not caught" in capsys.readouterr().out


class Gate(nn.Module):
    """A linear model whose first training forward says it has started, then waits until it is let go."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.started, self.go = nn.Linear(3, 2), threading.Event(), threading.Event()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Hold the first training step until `go` is set."""
        if self.training and not self.started.is_set():
            self.started.set()
            self.go.wait(timeout=60)
        return self.linear(inputs)


def test_a_second_fit_while_one_runs_in_the_process_is_refused_and_the_first_is_untouched(tmp_path):
    # Two runs in one process shared its RNG streams (results changed silently) and one stopped the other's workers.
    data, results = TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,))), []
    gate = Gate()
    first = threading.Thread(target=lambda: results.append(fit_gate(gate, data, tmp_path / "first")))
    first.start()
    try:
        assert gate.started.wait(timeout=60)
        with pytest.raises(UsageError, match=r"^fit\(\) is already running in this process .* one run at a time"):
            ddp_trainer.fit(nn.Linear(3, 2), data, overrides=[*CPU, f"output_dir={tmp_path / 'second'}"])
    finally:
        gate.go.set()
        first.join()
    assert [record["epoch"] for record in results] == [1]
    assert not (tmp_path / "second").exists()
    after = [*CPU, "trainer.epochs=1", f"output_dir={tmp_path / 'next'}"]
    assert ddp_trainer.fit(nn.Linear(3, 2), data, overrides=after)["epoch"] == 1  # the process runs the next one


def fit_gate(gate: Gate, data: Dataset, output_dir: Path) -> dict:
    """One epoch of `gate` on `data` into `output_dir`."""
    return ddp_trainer.fit(gate, data, overrides=[*CPU, "trainer.epochs=1", f"output_dir={output_dir}"])


def test_a_clean_up_interrupted_by_a_second_ctrl_c_still_frees_the_folder_and_the_handlers(tmp_path, monkeypatch):
    # A second Ctrl-C while W&B finished skipped the rest: the folder stayed "in use by another run in this process"
    # and SIGTERM kept the dead run's handler.
    data = TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,)))
    overrides = [*CPU, "trainer.epochs=2", f"output_dir={tmp_path}"]
    model = nn.Linear(3, 2)
    before, draws = signal.getsignal(signal.SIGTERM), torch.get_rng_state()

    def interrupted(self, exit_code: int = 0) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(ddp_trainer.loggers.RunLogger, "finish", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ddp_trainer.fit(model, data, overrides=overrides)
    assert signal.getsignal(signal.SIGTERM) is before
    assert torch.equal(torch.get_rng_state(), draws)
    assert ddp_trainer.fit(nn.Linear(3, 2), data, overrides=overrides)["epoch"] == 2  # the folder is free again


def test_fit_refuses_a_finished_runs_checkpoint_in_a_new_folder_rather_than_exiting(tmp_path):
    # It raised SystemExit(0): nothing trained, no record, and a sweep's `except Exception` did not see it.
    data = TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,)))
    ddp_trainer.fit(nn.Linear(3, 2), data, overrides=[*CPU, "trainer.epochs=1", f"output_dir={tmp_path / 'done'}"])
    last = tmp_path / "done" / "checkpoints" / "last.pt"
    again = [*CPU, "trainer.epochs=1", f"trainer.resume={last}", f"output_dir={tmp_path / 'branch'}"]
    with pytest.raises(UsageError, match=rf"^trainer.resume={re.escape(str(last))} is a finished run \(1 of 1 epochs"):
        ddp_trainer.fit(nn.Linear(3, 2), data, overrides=again)


def test_fit_refuses_a_model_an_earlier_fit_checkpointed_in_place_instead_of_failing_inside_torch(tmp_path):
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    data = TensorDataset(torch.randn(16, 3), torch.randint(0, 2, (16,)))
    overrides = [*CPU, "trainer.strategy=fsdp", "trainer.fsdp_wrap=[Linear]", "trainer.activation_checkpointing=true"]
    assert ddp_trainer.fit(model, data, overrides=[*overrides, f"output_dir={tmp_path / 'a'}"])["epoch"] == 10
    with pytest.raises(UsageError, match="^fit\\(\\) was given a model that fully_shard or checkpoint changed"):
        ddp_trainer.fit(model, data, overrides=[*overrides, f"output_dir={tmp_path / 'b'}"])  # was an AssertionError


def test_fit_refuses_a_model_that_is_not_a_module(tmp_path):
    with pytest.raises(UsageError, match="fit\\(\\) trains an nn.Module, not function"):
        ddp_trainer.fit(lambda inputs: inputs, TensorDataset(torch.zeros(4, 3)), overrides=[f"output_dir={tmp_path}"])


def test_fit_refuses_a_lazy_model_a_ddp_wrapped_one_and_a_process_group_it_did_not_start(tmp_path):
    data, overrides = TensorDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)), [f"output_dir={tmp_path}"]
    with pytest.raises(UsageError, match="parameter 0.weight is not initialised yet .*: run one batch through"):
        ddp_trainer.fit(nn.Sequential(nn.LazyLinear(2)), data, overrides=overrides)
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(UsageError, match=r"wraps the model in DDP itself: pass the bare module \(model.module\)"):
            ddp_trainer.fit(DistributedDataParallel(nn.Linear(3, 2)), data, overrides=overrides)
        with pytest.raises(UsageError, match="joins the process group itself .* without init_process_group"):
            ddp_trainer.fit(nn.Linear(3, 2), data, overrides=overrides)
    finally:
        torch.distributed.destroy_process_group()
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize(
    ("train_data", "message"),
    [
        (DataLoader(TensorDataset(torch.zeros(4, 3))), "train_data is a DataLoader; give its dataset"),
        (None, "train_data must be a map-style Dataset .* not NoneType"),
        ((row for row in torch.zeros(4, 3)), "train_data must be a map-style Dataset .* not generator"),
        (TensorDataset(torch.zeros(0, 3)), "train_data is empty$"),
        ((torch.zeros(4, 3), torch.zeros(4)), "train_data is a tuple; give a Dataset of samples, e.g. TensorDataset"),
        ({"inputs": torch.zeros(4, 3)}, "train_data is a dict; give a Dataset of samples"),
        (torch.zeros(4, 3), "train_data is a Tensor; give a Dataset of samples"),
    ],
    ids=["loader", "none", "generator", "empty", "tuple", "dict", "tensor"],
)
def test_fit_names_data_it_cannot_train_on(tmp_path, train_data, message):
    with pytest.raises(UsageError, match=f"^fit\\(\\): {message}"):
        ddp_trainer.fit(torch.nn.Linear(3, 2), train_data, overrides=[f"output_dir={tmp_path}"])
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"overrides": "trainer.epochs=1"}, "fit\\(\\): overrides must be a list of key=value strings, not one string"),
        ({"overrides": None}, "fit\\(\\): overrides must be a list of key=value strings, not None"),
        ({"overrides": {"trainer.epochs": 1}}, "overrides must be a list of key=value strings, not \\{'trainer"),
        ({"overrides": ["trainer.epochs=1", 5]}, "overrides must be a list of key=value strings, not \\['trainer"),
        ({"config": ["trainer.epochs=1"]}, "fit\\(\\): config must be a YAML path, a dict of keys or None, not list"),
        (
            {"overrides": ["task=regression"]},
            "config key 'task' is 'regression', fit's task 'classification' .*; pass task='regression' to train",
        ),
        ({"overrides": ["task=Ranking"]}, r"config key 'task' is 'Ranking', .*; pass task=Ranking\(\) to train"),
    ],
    ids=[
        "overrides-string",
        "overrides-none",
        "overrides-dict",
        "overrides-int",
        "config-list",
        "task-key",
        "own-task",
    ],
)
def test_fit_names_arguments_it_would_misread(tmp_path, arguments, message):
    data = TensorDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UsageError, match=message):
        ddp_trainer.fit(torch.nn.Linear(3, 2), data, **arguments)


def test_a_regression_run_stopped_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    generator = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(96, 3, generator=generator), torch.randn(96, generator=generator))
    val = TensorDataset(torch.randn(20, 3, generator=generator), torch.randn(20, generator=generator))

    def fit(output_dir, *extra: str) -> dict:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 1))
        args = [*CPU, "trainer.epochs=3", "data.batch_size=8", f"output_dir={output_dir}", *extra]
        return ddp_trainer.fit(model, data, val, task="regression", overrides=args)

    straight = fit(tmp_path / "straight")
    fit(tmp_path / "split", "trainer.max_steps=17")  # 12 steps per epoch: stops 5 steps into epoch 2
    assert fit(tmp_path / "split") == {**straight, "time/train_s": ANY, "time/epoch_s": ANY}
    weights = [checkpoint.load(tmp_path / run / "checkpoints" / "last.pt")["model"] for run in ("straight", "split")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_fit_refuses_keys_that_would_build_the_model_or_data_it_was_given(tmp_path):
    data = TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    for key in ("model.hidden_sizes=[8]", "data.name=digits", "data.download=true"):
        with pytest.raises(UsageError, match=f"config key '{key.split('=')[0]}' does nothing here: fit\\(\\) is given"):
            ddp_trainer.fit(nn.Linear(3, 2), data, overrides=[*CPU, key, f"output_dir={tmp_path}"])
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_fit_runs_config_yaml_trains_again_with_fit_and_the_cli_refuses_it(tmp_path, capsys):
    generator = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(48, 3, generator=generator), torch.randint(0, 2, (48,), generator=generator))

    def fit(*arguments: str, config: Path | None = None) -> dict:
        torch.manual_seed(0)
        return ddp_trainer.fit(nn.Linear(3, 2), data, data, config=config, overrides=[*CPU, *arguments])

    first = fit("trainer.epochs=2", "data.batch_size=8", f"output_dir={tmp_path / 'first'}")
    saved = tmp_path / "first" / "config.yaml"
    written = saved.read_text()
    assert "name: given" in written and "hidden_sizes" not in written and "synthetic" not in written
    again = fit(f"output_dir={tmp_path / 'again'}", config=saved)  # batch size and epochs come from the file
    assert again == {**first, "time/train_s": ANY, "time/epoch_s": ANY}

    assert main(["--config", str(saved)]) == 2
    assert main(["evaluate", "--checkpoint", str(tmp_path / "first" / "checkpoints" / "last.pt")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-2] == (
        "ddp-train: error: config key 'data.name' is 'given': fit() saved this config for datasets and a model given "
        "as Python objects, which no config key rebuilds; pass it to fit(config=...) with them"
    )
    path = tmp_path / "first" / "checkpoints" / "last.pt"
    assert lines[-1].startswith(f"ddp-train evaluate: error: checkpoint {path} was saved by fit() ")
    assert LOAD_WEIGHTS in lines[-1]
    model = nn.Linear(3, 2)
    exec(LOAD_WEIGHTS, {"model": model, "torch": torch, "path": path})  # the advice, as a user would type it
    torch.testing.assert_close(model.state_dict(), checkpoint.load(path)["model"])


def test_a_fit_checkpoint_that_saved_the_default_names_still_resumes(tmp_path):
    data = TensorDataset(torch.randn(32, 3), torch.randint(0, 2, (32,)))
    arguments = [*CPU, "data.batch_size=8", f"output_dir={tmp_path}"]
    ddp_trainer.fit(nn.Linear(3, 2), data, overrides=[*arguments, "trainer.epochs=1"])
    last = tmp_path / "checkpoints" / "last.pt"
    state = checkpoint.load(last)
    # As fit() saved them before the names were `given`: the defaults, which built nothing.
    state["config"]["data"] = {**state["config"]["data"], "name": "digits", "root": "data", "augment": True}
    state["config"]["model"] = {**state["config"]["model"], "name": "mlp", "hidden_sizes": [512, 256]}
    torch.save(state, last)
    record = ddp_trainer.fit(nn.Linear(3, 2), data, overrides=[*arguments, "trainer.epochs=2"])
    assert (record["epoch"], record["step"]) == (2, 8)


class OneValueLoss(Classification):
    """Its forward gives the loss as a tensor of shape (1,): one value, as the protocol asks."""

    def forward(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        loss, sums = super().forward(model, batch)
        return loss.view(1), sums


class DetachedStepLoss(Classification):
    """Its step_outputs gives a loss cut from the weights: backward would fail far from the task."""

    def step_outputs(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        loss, outputs = super().step_outputs(model, batch)
        return loss.detach(), outputs


def blob_data(count: int = 64) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(count, 4, generator=generator), torch.arange(count) % 3)


def test_a_loss_of_shape_one_trains_under_skip_with_a_fused_optimizer(tmp_path):
    # Judged for skipping, it resized the 0-d flag AdamW reads as found_inf: "output with shape [] doesn't match".
    args = [*CPU, "trainer.nonfinite_loss=skip", "trainer.epochs=1", "data.batch_size=16", f"output_dir={tmp_path}"]
    record = ddp_trainer.fit(nn.Linear(4, 3), blob_data(), blob_data(32), task=OneValueLoss(), overrides=args)
    assert record["step"] == 4 and math.isfinite(record["train/loss"])


def test_a_step_outputs_loss_cut_from_the_weights_is_named_in_one_line(tmp_path):
    # Only forward's loss was checked: this one failed in backward, "element 0 of tensors does not require grad".
    with pytest.raises(UsageError, match="^task DetachedStepLoss: step_outputs's loss is detached from the model's"):
        ddp_trainer.fit(
            nn.Linear(4, 3), blob_data(), task=DetachedStepLoss(), overrides=[*CPU, f"output_dir={tmp_path}"]
        )


class AlwaysNaN(nn.Module):
    """Logits that are NaN at every step: each one is skipped under trainer.nonfinite_loss=skip."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(inputs) * float("nan")


def test_an_epoch_whose_every_step_was_skipped_has_no_loss_not_a_perfect_one(tmp_path):
    # Its train/loss read 0.0: with no validation, best.pt took that epoch for good.
    args = [*CPU, "trainer.nonfinite_loss=skip", "trainer.epochs=1", "data.batch_size=16", f"output_dir={tmp_path}"]
    record = ddp_trainer.fit(AlwaysNaN(), blob_data(), overrides=args)
    assert (
        record["train/skipped_steps"] == 4 and math.isnan(record["train/loss"]) and math.isnan(record["train/accuracy"])
    )


class TokenRows(Dataset):
    """Rows of token ids, each sample a tensor of its own."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.tokens[index]


def test_a_language_model_reads_token_rows_wrapped_in_a_tensor_dataset(tmp_path):
    # TensorDataset(tokens) gives its samples and batches as 1-tuples: "a batch must be (inputs, targets)... not a list
    # of 1", though a tensor of token ids is a layout the task reads.
    tokens = torch.randint(0, 16, (64, 9), generator=torch.Generator().manual_seed(0))
    args = [*CPU, "trainer.epochs=1", "data.batch_size=16"]
    records = []
    for name, rows in (("wrapped", TensorDataset(tokens)), ("plain", TokenRows(tokens))):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
        overrides = [*args, f"output_dir={tmp_path / name}"]
        records.append(ddp_trainer.fit(model, rows, rows, task="language_model", overrides=overrides))
    assert records[0]["val/loss"] == records[1]["val/loss"] and records[0]["val/samples"] == 64


@pytest.mark.parametrize("frozen", [False, True])
def test_a_model_with_nothing_to_train_is_refused_in_one_line(tmp_path, frozen):
    # "optimizer got an empty parameter list", or backward's "element 0 of tensors does not require grad".
    model = nn.Linear(4, 3).requires_grad_(False) if frozen else nn.Identity()
    name = type(model).__name__
    with pytest.raises(
        UsageError, match=rf"^the model \({name}\) has no parameter to train: none, or all with requires"
    ):
        ddp_trainer.fit(model, blob_data(), overrides=[*CPU, f"output_dir={tmp_path}"])
