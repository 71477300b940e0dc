"""Tests for weight matching (node.merge.match_weights and apply_permutations)."""

from __future__ import annotations

import pytest
import torch

from node.merge import PermutationSpec, apply_permutations, match_weights
from node.tasks.digits import DigitsHyperparameters, DigitsTask


def _two_layer_task() -> DigitsTask:
    return DigitsTask(DigitsHyperparameters(hidden_sizes=(16, 12)))


def test_matching_recovers_known_permutation() -> None:
    task = _two_layer_task()
    spec = task.permutation_spec()
    original = task.initial_params(seed=3)
    generator = torch.Generator().manual_seed(11)
    shuffles = {
        "hidden1": torch.randperm(16, generator=generator),
        "hidden2": torch.randperm(12, generator=generator),
    }
    shuffled = apply_permutations(spec, shuffles, original)

    found = match_weights(spec, original, shuffled)

    # shuffled = original indexed by `shuffles`, so the inverse undoes it.
    assert torch.equal(found["hidden1"], torch.argsort(shuffles["hidden1"]))
    assert torch.equal(found["hidden2"], torch.argsort(shuffles["hidden2"]))
    aligned = apply_permutations(spec, found, shuffled)
    for name, tensor in original.items():
        assert torch.equal(aligned[name], tensor), name


def test_shuffled_model_computes_same_function() -> None:
    task = _two_layer_task()
    spec = task.permutation_spec()
    original = task.initial_params(seed=3)
    shuffles = {"hidden1": torch.randperm(16, generator=torch.Generator().manual_seed(5))}
    shuffled = apply_permutations(spec, shuffles, original)
    data = task.load_data(orgs=2, split="iid", deduction=1.0, seed=0).test

    before = task.evaluate(original, data, device="cpu")
    after = task.evaluate(shuffled, data, device="cpu")

    assert after.accuracy == before.accuracy
    assert after.loss == pytest.approx(before.loss, rel=1e-5)


def test_matching_identity_for_same_model() -> None:
    task = _two_layer_task()
    spec = task.permutation_spec()
    params = task.initial_params(seed=0)

    found = match_weights(spec, params, params)

    assert torch.equal(found["hidden1"], torch.arange(16))
    assert torch.equal(found["hidden2"], torch.arange(12))


def test_matching_deterministic() -> None:
    task = _two_layer_task()
    spec = task.permutation_spec()
    local = task.initial_params(seed=0)
    incoming = task.initial_params(seed=1)

    first = match_weights(spec, local, incoming)
    second = match_weights(spec, local, incoming)

    assert all(torch.equal(first[name], second[name]) for name in first)


def test_matching_subset_keeps_identity() -> None:
    task = _two_layer_task()
    spec = task.permutation_spec()
    original = task.initial_params(seed=3)
    shuffles = {"hidden2": torch.randperm(12, generator=torch.Generator().manual_seed(2))}
    # The offer lacks hidden1.bias, so the hidden1 permutation cannot be matched.
    offer = {
        name: tensor
        for name, tensor in apply_permutations(spec, shuffles, original).items()
        if name != "hidden1.bias"
    }

    found = match_weights(spec, original, offer)

    assert torch.equal(found["hidden1"], torch.arange(16))
    assert torch.equal(found["hidden2"], torch.argsort(shuffles["hidden2"]))
    assert set(apply_permutations(spec, found, offer)) == set(offer)


def test_spec_rejects_shared_axis() -> None:
    with pytest.raises(ValueError, match="claimed by both"):
        PermutationSpec({"p": (("w", 0),), "q": (("w", 0),)})
