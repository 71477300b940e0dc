"""Error messages of config.toml loading: each names the file, section, key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from node import tasks
from node.config import ConfigError, TaskSection, load, parse, validate_task
from node.tasks.digits import SPLITS as DIGITS_SPLITS
from node.tasks.digits import DigitsTask

PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"


def _error(text: str, source: str = "config.toml") -> str:
    with pytest.raises(ConfigError) as raised:
        parse(text, source)
    return str(raised.value)


def test_unknown_section_keeps_brackets() -> None:
    message = _error("[limitz]\n")

    assert message.startswith("config.toml: unknown section [limitz]")
    assert "did you mean [limits]?" in message
    assert "known sections are node, limits," in message


def test_unknown_key_names_file_and_section() -> None:
    message = _error("[limits]\nmax_conections = 128\n")

    assert message.startswith("config.toml: unknown key 'max_conections' in [limits]")
    assert "did you mean max_connections?" in message


def test_unknown_key_without_close_match() -> None:
    message = _error("[limits]\nzzz = 1\n")

    assert "did you mean" not in message
    assert "known keys are max_connections," in message


def test_wrong_type_names_file_section_key() -> None:
    message = _error('[limits]\nmax_connections = "lots"\n')

    assert message == "config.toml: [limits] max_connections must be an integer, got 'lots'"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[node]\nmdns = 1\n", "config.toml: [node] mdns must be true or false, got 1"),
        ('[gossip]\nheartbeat_s = "1s"\n', "config.toml: [gossip] heartbeat_s must be a number, got '1s'"),
        ("[node]\nlog_level = 3\n", "config.toml: [node] log_level must be a string, got 3"),
        ("[gossip]\nfamilies = [1]\n", "config.toml: [gossip] families must be a list of strings, got [1]"),
        ('[node]\nlisten = "/ip4/127.0.0.1/tcp/0"\n',
         "config.toml: [node] listen must be a list of strings, got '/ip4/127.0.0.1/tcp/0'"),
    ],
)
def test_wrong_type_names_toml_type(text: str, expected: str) -> None:
    assert _error(text) == expected


def test_section_not_table_names_file() -> None:
    assert _error("limits = 3\n") == "config.toml: [limits] must be a table, got int"


def test_load_names_the_file_path(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[limits]\nmax_connections = "lots"\n', encoding="utf-8")

    with pytest.raises(ConfigError) as raised:
        load(path)

    assert str(raised.value) == f"{path}: [limits] max_connections must be an integer, got 'lots'"


def test_unknown_task_lists_known_tasks() -> None:
    message = _error('[task]\nname = "nosuchtask"\n')

    assert message.startswith("config.toml: [task] name 'nosuchtask' is not a known task")
    assert "known tasks: digits" in message


def test_unknown_split_lists_task_splits() -> None:
    message = _error('[task]\nname = "digits"\nsplit = "random"\n')

    assert message == "config.toml: [task] split 'random' is not a split of task digits; use one of complementary, iid"


def test_known_task_and_split_load() -> None:
    config = parse('[task]\nname = "digits"\norgs = 2\nindex = 1\nsplit = "complementary"\ndeduction = 0.1\n')

    assert config.task.name == "digits"
    assert config.task.split == "complementary"


def test_split_unchecked_without_task() -> None:
    # Without a task no data is split, so the split is not looked up.
    assert parse('[task]\nsplit = "random"\n').task.split == "random"


@pytest.mark.parametrize("deduction", [0.0, -0.5, 1.5])
def test_deduction_out_of_range(deduction: float) -> None:
    with pytest.raises(ConfigError, match=r"deduction .* must be greater than 0 and at most 1"):
        validate_task(TaskSection(name="digits", split="complementary", deduction=deduction))


def test_orgs_below_one() -> None:
    with pytest.raises(ConfigError, match=r"\[task\] orgs 0 must be at least 1"):
        validate_task(TaskSection(orgs=0))


def test_listen_host_port_gets_example() -> None:
    message = _error('[node]\nlisten = ["127.0.0.1:4001"]\n')

    assert message.startswith("config.toml: [node] listen address '127.0.0.1:4001' is not a valid multiaddr")
    assert message.endswith("write it as /ip4/127.0.0.1/tcp/4001")


def test_listen_example_uses_given_host_port() -> None:
    message = _error('[node]\nlisten = ["0.0.0.0:9000"]\n')

    assert message.endswith("write it as /ip4/0.0.0.0/tcp/9000")


def test_listen_garbage_gets_example() -> None:
    message = _error('[node]\nlisten = ["garbage"]\n')

    assert "(unknown protocol: garbage)" in message
    assert message.endswith("write it as /ip4/127.0.0.1/tcp/4001")


def test_empty_listen_address_rejected() -> None:
    message = _error('[node]\nlisten = [""]\n')

    assert message == "config.toml: [node] listen address is empty; write it as /ip4/127.0.0.1/tcp/4001"


def test_bootstrap_host_port_gets_peer_example() -> None:
    message = _error('[node]\nbootstrap = ["127.0.0.1:4001"]\n')

    assert message.endswith("write it as /ip4/127.0.0.1/tcp/4001/p2p/<peer ID>")


def test_bootstrap_without_peer_id() -> None:
    message = _error('[node]\nbootstrap = ["/ip4/127.0.0.1/tcp/45447"]\n')

    assert message.startswith("config.toml: [node] bootstrap address '/ip4/127.0.0.1/tcp/45447' must end in /p2p/<peer ID>")
    assert "for example /ip4/127.0.0.1/tcp/45447/p2p/12D3KooW..." in message


def test_bootstrap_with_peer_id_loads() -> None:
    address = f"/ip4/127.0.0.1/tcp/45447/p2p/{PEER}"

    assert parse(f'[node]\nbootstrap = ["{address}"]\n').node.bootstrap == [address]


def test_bootstrap_peer_id_not_last() -> None:
    message = _error(f'[node]\nbootstrap = ["/ip4/127.0.0.1/tcp/1/p2p/{PEER}/tcp/2"]\n')

    assert "must end in /p2p/<peer ID>" in message


def test_task_splits_match_digits() -> None:
    assert tasks.task_splits("digits") == DIGITS_SPLITS
    assert tasks.task_splits("nosuchtask") == ()


def test_registered_task_splits_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "_FACTORIES", dict(tasks._FACTORIES))
    monkeypatch.setattr(tasks, "_SPLITS", dict(tasks._SPLITS))
    tasks.register_task("toy", DigitsTask, splits=["halves"])

    validate_task(TaskSection(name="toy", split="halves"))
    with pytest.raises(ConfigError, match="split 'iid' is not a split of task toy; use one of halves"):
        validate_task(TaskSection(name="toy", split="iid"))
