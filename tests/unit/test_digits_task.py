"""Tests for the digits task: data splits, training, evaluation and the registry."""

from __future__ import annotations

import itertools

import pytest
import torch

from node.tasks import get_task
from node.tasks.base import TaskData
from node.tasks.digits import NUM_CLASSES, DigitsHyperparameters, DigitsTask

TOTAL_EXAMPLES = 1797


def _rows(data: TaskData) -> list[set[int]]:
    """Index sets of every training shard, every validation set and the test set."""
    parts = [*data.train, *data.validation, data.test]
    return [set(part.indices.tolist()) for part in parts]


@pytest.fixture(scope="module")
def task() -> DigitsTask:
    return DigitsTask(DigitsHyperparameters(hidden_sizes=(32,)))


@pytest.mark.parametrize(
    ("orgs", "deduction"), list(itertools.product([2, 3, 4, 8], [0.1, 0.2, 0.4, 0.6, 0.8]))
)
def test_complementary_split_rule(task: DigitsTask, orgs: int, deduction: float) -> None:
    data = task.load_data(orgs=orgs, split="complementary", deduction=deduction, seed=7)

    parts = _rows(data)
    assert sum(len(part) for part in parts) == TOTAL_EXAMPLES
    assert len(set().union(*parts)) == TOTAL_EXAMPLES  # pairwise disjoint and complete
    owners = [label for group in data.strong_classes for label in group]
    assert sorted(owners) == list(range(NUM_CLASSES))

    counts = [shard.class_counts(NUM_CLASSES) for shard in data.train]
    for org, group in enumerate(data.strong_classes):
        for label in range(NUM_CLASSES):
            pool = sum(shard_counts[label] for shard_counts in counts)
            owner = next(i for i, strong in enumerate(data.strong_classes) if label in strong)
            if label in group:
                # Owner share of the pool is 1 / (1 + (orgs - 1) * deduction).
                assert abs(counts[org][label] - pool / (1 + (orgs - 1) * deduction)) <= 1
            else:
                assert abs(counts[org][label] - deduction * counts[owner][label]) <= 1


def test_complementary_full_deduction_even(task: DigitsTask) -> None:
    data = task.load_data(orgs=4, split="complementary", deduction=1.0, seed=0)

    for label in range(NUM_CLASSES):
        per_org = [shard.class_counts(NUM_CLASSES)[label] for shard in data.train]
        assert max(per_org) - min(per_org) <= 1


def test_validation_balanced(task: DigitsTask) -> None:
    data = task.load_data(orgs=4, split="complementary", deduction=0.1, seed=0)

    counts = [validation.class_counts(NUM_CLASSES) for validation in data.validation]
    for label in range(NUM_CLASSES):
        # Each class's validation part is dealt out evenly over organizations.
        per_org = [org_counts[label] for org_counts in counts]
        assert max(per_org) - min(per_org) <= 1, label
    for org_counts in counts:
        # Classes have 174 to 183 examples, so their validation parts differ by up to 2.
        assert max(org_counts) - min(org_counts) <= 2


def test_test_set_stratified(task: DigitsTask) -> None:
    data = task.load_data(orgs=4, split="complementary", deduction=0.1, seed=0)

    counts = data.test.class_counts(NUM_CLASSES)
    assert min(counts) >= 35
    assert max(counts) <= 37


def test_iid_split_equal_shares(task: DigitsTask) -> None:
    data = task.load_data(orgs=3, split="iid", deduction=0.5, seed=1)

    parts = _rows(data)
    assert len(set().union(*parts)) == sum(len(part) for part in parts)
    sizes = [len(shard) for shard in data.train]
    assert max(sizes) - min(sizes) <= 1


def test_split_deterministic_in_seed(task: DigitsTask) -> None:
    first = task.load_data(orgs=4, split="complementary", deduction=0.2, seed=3)
    again = task.load_data(orgs=4, split="complementary", deduction=0.2, seed=3)
    other = task.load_data(orgs=4, split="complementary", deduction=0.2, seed=4)

    assert _rows(first) == _rows(again)
    assert first.strong_classes == again.strong_classes
    assert _rows(first) != _rows(other)


def test_split_rejects_bad_arguments(task: DigitsTask) -> None:
    with pytest.raises(ValueError, match="deduction is 0"):
        task.load_data(orgs=4, split="complementary", deduction=0.0, seed=0)
    with pytest.raises(ValueError, match="orgs is 11"):
        task.load_data(orgs=11, split="complementary", deduction=0.1, seed=0)
    with pytest.raises(ValueError, match="unknown split 'skewed'"):
        task.load_data(orgs=4, split="skewed", deduction=0.1, seed=0)


def test_inputs_scaled_to_unit_range(task: DigitsTask) -> None:
    data = task.load_data(orgs=2, split="iid", deduction=1.0, seed=0)

    assert float(data.test.inputs.min()) == -1.0
    assert float(data.test.inputs.max()) == 1.0


def test_build_model_deterministic(task: DigitsTask) -> None:
    first = task.initial_params(seed=5)
    again = task.initial_params(seed=5)
    other = task.initial_params(seed=6)

    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["hidden1.weight"], other["hidden1.weight"])


def test_tensor_names_stable(task: DigitsTask) -> None:
    names = list(task.build_model(seed=0).state_dict())

    assert names == ["hidden1.weight", "hidden1.bias", "output.weight", "output.bias"]


def test_module_matches_evaluate(task: DigitsTask) -> None:
    model = task.build_model(seed=2)
    data = task.load_data(orgs=2, split="iid", deduction=1.0, seed=0).test

    with torch.no_grad():
        predictions = model(data.inputs).argmax(dim=1)
    accuracy = float((predictions == data.targets).float().mean())

    assert task.evaluate(model.state_dict(), data, device="cpu").accuracy == pytest.approx(
        accuracy, abs=1e-9
    )


def test_train_epoch_deterministic(task: DigitsTask) -> None:
    shard = task.load_data(orgs=4, split="complementary", deduction=0.1, seed=0).train[0]
    params = task.initial_params(seed=0)

    first = task.train_epoch(params, shard, epoch=2, seed=9, device="cpu")
    again = task.train_epoch(params, shard, epoch=2, seed=9, device="cpu")

    assert all(torch.equal(first[name], again[name]) for name in first)


def test_train_epoch_no_hidden_state(task: DigitsTask) -> None:
    data = task.load_data(orgs=4, split="complementary", deduction=0.1, seed=0)
    params = task.initial_params(seed=0)
    fresh = DigitsTask(task.hyperparameters).train_epoch(
        params, data.train[1], epoch=1, seed=4, device="cpu"
    )

    # Unrelated training on the same instance must not change the next result.
    task.train_epoch(task.initial_params(seed=8), data.train[2], epoch=0, seed=1, device="cpu")
    after_other_work = task.train_epoch(params, data.train[1], epoch=1, seed=4, device="cpu")

    assert all(torch.equal(fresh[name], after_other_work[name]) for name in fresh)


def test_train_epoch_keeps_inputs_and_global_rng(task: DigitsTask) -> None:
    shard = task.load_data(orgs=2, split="iid", deduction=1.0, seed=0).train[0]
    params = task.initial_params(seed=0)
    copies = {name: tensor.clone() for name, tensor in params.items()}
    rng_state = torch.get_rng_state()

    task.train_epoch(params, shard, epoch=0, seed=0, device="cpu")

    assert all(torch.equal(params[name], copies[name]) for name in params)
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_train_epoch_seed_changes_order(task: DigitsTask) -> None:
    shard = task.load_data(orgs=2, split="iid", deduction=1.0, seed=0).train[0]
    params = task.initial_params(seed=0)

    first = task.train_epoch(params, shard, epoch=0, seed=0, device="cpu")
    other = task.train_epoch(params, shard, epoch=1, seed=0, device="cpu")

    assert not torch.equal(first["output.weight"], other["output.weight"])


def test_training_lowers_loss(task: DigitsTask) -> None:
    data = task.load_data(orgs=2, split="iid", deduction=1.0, seed=0)
    params = task.initial_params(seed=0)
    before = task.evaluate(params, data.validation[0], device="cpu")

    for epoch in range(3):
        params = task.train_epoch(params, data.train[0], epoch=epoch, seed=0, device="cpu")
    after = task.evaluate(params, data.validation[0], device="cpu")

    assert after.loss < before.loss
    assert after.accuracy > 0.8


def test_evaluate_rejects_wrong_shapes(task: DigitsTask) -> None:
    params = task.initial_params(seed=0)
    params["output.bias"] = torch.zeros(11)
    data = task.load_data(orgs=2, split="iid", deduction=1.0, seed=0).test

    with pytest.raises(ValueError, match=r"output\.bias has shape \(11,\), expected \(10,\)"):
        task.evaluate(params, data, device="cpu")


def test_get_task_digits() -> None:
    assert get_task("digits").name == "digits"


def test_get_task_unknown_lists_known() -> None:
    with pytest.raises(ValueError, match="unknown task 'mnist'; known tasks: digits"):
        get_task("mnist")


def test_registry_splits_match_task() -> None:
    from node.tasks import task_splits
    from node.tasks.digits import SPLITS

    assert task_splits("digits") == SPLITS
