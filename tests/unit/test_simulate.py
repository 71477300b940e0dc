"""Tests for the in-process market simulation."""

from __future__ import annotations

import pytest

from devnet.simulate import SimulationConfig, SimulationResult, format_table, main, simulate


@pytest.fixture(scope="module")
def small_run() -> SimulationResult:
    return simulate(SimulationConfig(orgs=2, rounds=2, seed=0))


def test_simulation_trade_count(small_run: SimulationResult) -> None:
    # Every buyer evaluates every other organization's snapshot once per round.
    assert len(small_run.trades) == 2 * 2 * 1


def test_simulation_merges_only_on_gain(small_run: SimulationResult) -> None:
    for trade in small_run.trades:
        assert trade.merged == (trade.gain > 0)


def test_simulation_never_self_trades(small_run: SimulationResult) -> None:
    assert all(trade.buyer != trade.seller for trade in small_run.trades)


def test_simulation_deterministic(small_run: SimulationResult) -> None:
    again = simulate(SimulationConfig(orgs=2, rounds=2, seed=0))

    assert again.orgs == small_run.orgs
    assert again.centralized == small_run.centralized
    assert again.trades == small_run.trades


def test_format_table_rows(small_run: SimulationResult) -> None:
    lines = format_table(small_run).splitlines()

    assert len(lines) == 2 + 2 + 2  # header, column names, orgs, mean, timing


def test_main_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--orgs", "2", "--rounds", "1", "--no-align"]) == 0

    assert "align=off" in capsys.readouterr().out
