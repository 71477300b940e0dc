"""Tests for the local model store: import, versions, atomic writes, export, subsets."""

from __future__ import annotations

import os
import pickle
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from node.models import ModelError, ModelStore, ModelVersion
from node.store import Database
from node.tasks.digits import DigitsTask
from protocol import limits
from protocol.codec import encode
from protocol.manifest import build_manifest, family_hash, manifest_root, parse_header

CHUNK = limits.MIN_CHUNK_SIZE


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "node.db")
    yield database
    database.close()


@pytest.fixture
def store(tmp_path: Path, db: Database) -> ModelStore:
    return ModelStore(tmp_path / "models", db, chunk_size=CHUNK)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # 300 x 100 float32 is 120,000 bytes, so the file spans two 64 KiB chunks.
    return {
        "layer.weight": torch.randn(300, 100, generator=generator),
        "layer.bias": torch.randn(300, generator=generator),
        "steps": torch.tensor([7], dtype=torch.int64),
    }


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def _rows(db: Database) -> list[sqlite3.Row]:
    return db.query("SELECT name, version, path FROM models")


def _tmp_files(store: ModelStore) -> list[Path]:
    return list((store.root / ".tmp").iterdir())


def test_import_round_trip(store: ModelStore, tmp_path: Path) -> None:
    source = _write(tmp_path / "model.safetensors", _tensors())

    model = store.import_file(source, name="mlp", now_ms=1_000)

    data = source.read_bytes()
    manifest = build_manifest(data, CHUNK)
    assert model.ref == "mlp@1"
    assert model.source == "import"
    assert model.total_bytes == len(data)
    assert model.chunk_size == CHUNK
    assert model.root == manifest_root(manifest)
    assert model.family == family_hash(parse_header(manifest.header).tensors)
    assert store.get("mlp") == model
    assert store.get("mlp@1") == model
    assert model.path.read_bytes() == data
    assert model.manifest_path.read_bytes() == encode(manifest)
    assert store.read_manifest(model) == manifest

    exported = store.export("mlp@1", tmp_path / "out.safetensors")
    assert exported.read_bytes() == data


def test_import_stores_relative_path(store: ModelStore, db: Database, tmp_path: Path) -> None:
    source = _write(tmp_path / "model.safetensors", _tensors())

    store.import_file(source, name="mlp", now_ms=1)

    assert [row["path"] for row in _rows(db)] == ["mlp/1.safetensors"]


@pytest.mark.parametrize(
    ("filename", "kind"),
    [
        ("weights.pt", "zip"),
        ("weights.pth", "legacy"),
        ("weights.pkl", "pickle"),
        ("disguised.safetensors", "zip"),
        ("disguised2.safetensors", "pickle"),
    ],
)
def test_import_rejects_checkpoints(
    store: ModelStore, tmp_path: Path, filename: str, kind: str
) -> None:
    path = tmp_path / filename
    if kind == "zip":
        torch.save(_tensors(), path)
    elif kind == "legacy":
        torch.save(_tensors(), path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}, protocol=4))

    with pytest.raises(ModelError) as caught:
        store.import_file(path, name="mlp", now_ms=1)

    message = str(caught.value)
    assert str(path) in message
    assert "torch.load(path, weights_only=True)" in message
    assert 'safetensors.torch.save_file(state_dict, "model.safetensors")' in message
    assert store.list() == []
    assert _tmp_files(store) == []


def test_import_rejects_trailing_garbage(store: ModelStore, tmp_path: Path) -> None:
    path = _write(tmp_path / "model.safetensors", _tensors())
    with path.open("ab") as file:
        file.write(b"garbage")

    with pytest.raises(ModelError, match="not a valid safetensors file"):
        store.import_file(path, name="mlp", now_ms=1)

    assert store.list() == []


def test_import_rejects_missing_file(store: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        store.import_file(tmp_path / "absent.safetensors", name="mlp", now_ms=1)


@pytest.mark.parametrize(
    "name", ["", "a/b", "..", ".tmp", "-lead", "x" * 65, "mlp@1", "naïve", "two words"]
)
def test_import_rejects_bad_name(store: ModelStore, tmp_path: Path, name: str) -> None:
    source = _write(tmp_path / "model.safetensors", _tensors())

    with pytest.raises(ModelError, match=r"model name .* is invalid"):
        store.import_file(source, name=name, now_ms=1)

    assert store.list() == []


@pytest.mark.parametrize("name", ["a", "MLP-v2_final.1", "x" * 64, "0"])
def test_import_accepts_good_name(store: ModelStore, tmp_path: Path, name: str) -> None:
    source = _write(tmp_path / "model.safetensors", _tensors())

    assert store.import_file(source, name=name, now_ms=1).name == name


def test_import_task_mismatch_lists_all(store: ModelStore, tmp_path: Path) -> None:
    params = DigitsTask().initial_params(0)
    params["hidden1.weight"] = torch.zeros(64, 64)
    params["output.bias"] = params["output.bias"].double()
    del params["output.weight"]
    params["extra"] = torch.zeros(3)
    source = _write(tmp_path / "digits.safetensors", params)

    with pytest.raises(ModelError) as caught:
        store.import_file(source, name="digits", task="digits", now_ms=1)

    problems = caught.value.problems
    assert len(problems) == 4
    assert any(p.startswith("hidden1.weight: shape is (64, 64)") for p in problems)
    assert any(p.startswith("output.bias: dtype is F64") for p in problems)
    assert any(p.startswith("output.weight: missing") for p in problems)
    assert any(p.startswith("extra: unexpected tensor") for p in problems)
    assert store.list() == []


def test_import_task_match(store: ModelStore, tmp_path: Path) -> None:
    source = _write(tmp_path / "digits.safetensors", DigitsTask().initial_params(0))

    model = store.import_file(source, name="digits", task="digits", now_ms=1)

    assert model.task == "digits"


def test_import_unknown_task_unchecked(store: ModelStore, tmp_path: Path) -> None:
    source = _write(tmp_path / "model.safetensors", _tensors())

    model = store.import_file(source, name="mlp", task="not-registered", now_ms=1)

    assert model.task == "not-registered"


def test_versions_increment(store: ModelStore, tmp_path: Path) -> None:
    first = store.import_file(_write(tmp_path / "a.safetensors", _tensors(0)), name="m", now_ms=1)
    second = store.import_file(_write(tmp_path / "b.safetensors", _tensors(1)), name="m", now_ms=2)
    other = store.import_file(_write(tmp_path / "c.safetensors", _tensors(2)), name="a", now_ms=3)

    assert first.version == 1
    assert second.version == 2
    assert store.latest("m") == second
    assert store.get("m") == second
    assert store.get("m@1") == first
    assert store.list() == [other, first, second]
    assert store.latest("absent") is None


def test_latest_of_family(store: ModelStore, tmp_path: Path) -> None:
    older = store.import_file(_write(tmp_path / "a.safetensors", _tensors(0)), name="a", now_ms=20)
    newer = store.import_file(_write(tmp_path / "b.safetensors", _tensors(1)), name="b", now_ms=30)
    oldest = store.import_file(_write(tmp_path / "c.safetensors", _tensors(2)), name="c", now_ms=10)
    different = store.import_file(
        _write(tmp_path / "d.safetensors", {"w": torch.zeros(2)}), name="d", now_ms=40
    )

    assert older.family == newer.family == oldest.family
    assert store.latest_of_family(older.family) == newer
    assert store.latest_of_family(different.family) == different
    assert store.latest_of_family(b"\x00" * 32) is None


def test_get_unknown_name_lists_names(store: ModelStore, tmp_path: Path) -> None:
    store.import_file(_write(tmp_path / "a.safetensors", _tensors()), name="alpha", now_ms=1)
    store.import_file(_write(tmp_path / "b.safetensors", _tensors()), name="beta", now_ms=1)

    with pytest.raises(ModelError, match="known models: alpha, beta"):
        store.get("gamma")


def test_get_unknown_version_lists_versions(store: ModelStore, tmp_path: Path) -> None:
    store.import_file(_write(tmp_path / "a.safetensors", _tensors()), name="alpha", now_ms=1)

    with pytest.raises(ModelError, match="its versions are 1"):
        store.get("alpha@2")


@pytest.mark.parametrize("ref", ["alpha@0", "alpha@", "alpha@x", "alpha@-1"])
def test_get_bad_ref(store: ModelStore, ref: str) -> None:
    with pytest.raises(ModelError, match="is invalid"):
        store.get(ref)


def test_add_tensors_round_trip(store: ModelStore, db: Database, tmp_path: Path) -> None:
    base = store.add_tensors(
        "mlp", _tensors(0), task="", source="init", now_ms=5
    )
    tensors = _tensors(1)

    merged = store.add_tensors(
        "mlp",
        tensors,
        task="",
        source="merge",
        parent=base.version,
        deal_id=b"\x01" * 32,
        metrics={"gain": 0.25, "accuracy": 0.9},
        now_ms=6,
    )

    reopened = ModelStore(tmp_path / "models", db, chunk_size=CHUNK).get("mlp@2")
    assert reopened == merged
    assert reopened.parent == 1
    assert reopened.deal_id == b"\x01" * 32
    assert reopened.metrics == {"gain": 0.25, "accuracy": 0.9}
    assert reopened.source == "merge"
    loaded = store.load_tensors(reopened)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


def test_add_tensors_non_contiguous(store: ModelStore) -> None:
    transposed = torch.arange(12.0).reshape(3, 4).T

    model = store.add_tensors("t", {"w": transposed}, task="", source="train", now_ms=1)

    assert torch.equal(store.load_tensors(model)["w"], transposed)


def test_add_tensors_missing_parent(store: ModelStore) -> None:
    with pytest.raises(ModelError, match="parent version 4 of model 'mlp' does not exist"):
        store.add_tensors("mlp", _tensors(), task="", source="train", parent=4, now_ms=1)

    assert store.list() == []


@pytest.mark.parametrize(
    ("source", "metrics", "message"),
    [
        ("bought", {}, "source 'bought' is invalid"),
        ("train", {"loss": float("nan")}, "metric 'loss' is nan"),
    ],
)
def test_add_tensors_bad_arguments(
    store: ModelStore, source: str, metrics: dict[str, float], message: str
) -> None:
    with pytest.raises(ModelError, match=message):
        store.add_tensors("mlp", _tensors(), task="", source=source, metrics=metrics, now_ms=1)


def test_add_file_moves_into_store(store: ModelStore, tmp_path: Path) -> None:
    incoming = _write(tmp_path / "assembled.safetensors", _tensors())
    data = incoming.read_bytes()

    model = store.add_file("bought", incoming, task="", deal_id=b"\x02" * 32, now_ms=1)

    assert model.source == "purchase"
    assert model.deal_id == b"\x02" * 32
    assert model.path.read_bytes() == data
    assert not incoming.exists()


def test_add_file_invalid_stays(store: ModelStore, tmp_path: Path) -> None:
    incoming = tmp_path / "assembled.safetensors"
    incoming.write_bytes(b"\x10" + b"\x00" * 7 + b"not json")

    with pytest.raises(ModelError, match="not a valid safetensors file"):
        store.add_file("bought", incoming, task="", now_ms=1)

    assert incoming.exists()
    assert store.list() == []


def test_add_file_kept_on_failure(store: ModelStore, db: Database, tmp_path: Path) -> None:
    incoming = _write(tmp_path / "assembled.safetensors", _tensors())
    data = incoming.read_bytes()

    def hook(connection: sqlite3.Connection, model: ModelVersion) -> None:
        raise ValueError("deal update rejected")

    with pytest.raises(ValueError, match="deal update rejected"):
        store.add_file("bought", incoming, task="", now_ms=1, commit_with=hook)

    assert incoming.read_bytes() == data
    assert _rows(db) == []
    assert _tmp_files(store) == []


def _rows_point_at_files(store: ModelStore, db: Database) -> bool:
    return all((store.root / row["path"]).is_file() for row in _rows(db))


def test_crash_before_row_insert(
    store: ModelStore, db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _write(tmp_path / "model.safetensors", _tensors())

    def crash(self: ModelStore, connection: sqlite3.Connection, model: ModelVersion) -> None:
        raise RuntimeError("simulated crash between the file rename and the row insert")

    with monkeypatch.context() as patch:
        patch.setattr(ModelStore, "_insert_row", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            store.import_file(source, name="mlp", now_ms=1)

    assert _rows(db) == []
    assert _tmp_files(store) == []
    # The orphan file is harmless: the next version of the name overwrites it.
    model = store.import_file(source, name="mlp", now_ms=2)
    assert model.version == 1
    assert _rows_point_at_files(store, db)
    assert model.path.read_bytes() == source.read_bytes()


def test_crash_during_rename(
    store: ModelStore, db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _write(tmp_path / "model.safetensors", _tensors())

    def fail_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", fail_replace)
        with pytest.raises(OSError, match="No space left"):
            store.import_file(source, name="mlp", now_ms=1)

    assert _rows(db) == []
    assert not (store.root / "mlp" / "1.safetensors").exists()
    assert _tmp_files(store) == []


def test_commit_hook_failure_rolls_back(store: ModelStore, db: Database) -> None:
    def hook(connection: sqlite3.Connection, model: ModelVersion) -> None:
        connection.execute("INSERT INTO meta (key, value) VALUES ('hooked', ?)", (model.ref,))
        raise ValueError("ledger entry rejected")

    with pytest.raises(ValueError, match="ledger entry rejected"):
        store.add_tensors("mlp", _tensors(), task="", source="train", now_ms=1, commit_with=hook)

    assert _rows(db) == []
    assert db.query_one("SELECT value FROM meta WHERE key = 'hooked'") is None


def test_commit_hook_commits_with_row(store: ModelStore, db: Database) -> None:
    def hook(connection: sqlite3.Connection, model: ModelVersion) -> None:
        connection.execute("INSERT INTO meta (key, value) VALUES ('hooked', ?)", (model.ref,))

    store.add_tensors("mlp", _tensors(), task="", source="train", now_ms=1, commit_with=hook)

    row = db.query_one("SELECT value FROM meta WHERE key = 'hooked'")
    assert row is not None
    assert row["value"] == "mlp@1"


def test_export_refuses_overwrite(store: ModelStore, tmp_path: Path) -> None:
    model = store.import_file(_write(tmp_path / "a.safetensors", _tensors()), name="m", now_ms=1)
    dest = tmp_path / "existing.safetensors"
    dest.write_bytes(b"keep me")

    with pytest.raises(ModelError, match="already exists"):
        store.export(model, dest)
    assert dest.read_bytes() == b"keep me"

    store.export(model, dest, overwrite=True)
    assert dest.read_bytes() == model.path.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_into_folder(store: ModelStore, tmp_path: Path) -> None:
    store.import_file(_write(tmp_path / "a.safetensors", _tensors()), name="m", now_ms=1)
    folder = tmp_path / "exports"
    folder.mkdir()

    assert store.export("m", folder) == folder / "m-1.safetensors"


def test_subset_file_holds_chosen_tensors(store: ModelStore, tmp_path: Path) -> None:
    tensors = _tensors()
    model = store.import_file(_write(tmp_path / "a.safetensors", tensors), name="m", now_ms=1)

    path = store.subset_file(model, ["steps", "layer.bias", "steps"])

    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == ["layer.bias", "steps"]
    loaded = load_file(str(path))
    assert torch.equal(loaded["layer.bias"], tensors["layer.bias"])
    assert torch.equal(loaded["steps"], tensors["steps"])
    assert path.parent == model.path.parent
    assert store.subset_manifest(model, ["layer.bias", "steps"]) == build_manifest(
        path.read_bytes(), CHUNK
    )


def test_subset_file_cached(store: ModelStore, tmp_path: Path) -> None:
    model = store.import_file(_write(tmp_path / "a.safetensors", _tensors()), name="m", now_ms=1)
    first = store.subset_file(model, ["layer.bias"])
    inode = first.stat().st_ino

    second = store.subset_file("m@1", ["layer.bias"])

    assert second == first
    assert second.stat().st_ino == inode


def test_subset_file_whole_model(store: ModelStore, tmp_path: Path) -> None:
    model = store.import_file(_write(tmp_path / "a.safetensors", _tensors()), name="m", now_ms=1)

    assert store.subset_file(model, []) == model.path
    assert store.subset_file(model, ["layer.weight", "layer.bias", "steps"]) == model.path


def test_subset_file_unknown_tensor(store: ModelStore, tmp_path: Path) -> None:
    model = store.import_file(_write(tmp_path / "a.safetensors", _tensors()), name="m", now_ms=1)

    with pytest.raises(ModelError, match="no tensors named 'nope'"):
        store.subset_file(model, ["layer.bias", "nope"])


def test_latest_of_family_prefers_task(store: ModelStore, tmp_path: Path) -> None:
    path = _write(tmp_path / "digits.safetensors", DigitsTask().initial_params(0))
    trained = store.import_file(path, name="mlp", task="digits", now_ms=10)
    copy = store.import_file(path, name="copy", task="", now_ms=20)
    assert copy.family == trained.family

    # The copy is newer, but it has no task, so a buyer cannot merge into it.
    assert store.latest_of_family(trained.family) == trained
    assert store.latest_of_family(trained.family, task="digits") == trained

    # A task that is not registered here is stored unchecked.
    other = store.import_file(path, name="other", task="other-task", now_ms=30)
    assert store.latest_of_family(trained.family) == other
    assert store.latest_of_family(trained.family, task="digits") == trained
    assert store.latest_of_family(trained.family, task="unknown") == other
