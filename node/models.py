"""The local model store: named models with numbered versions 1, 2, ...

Files live under the store's root (the node uses ``<data dir>/models``)::

    <name>/<version>.safetensors                the weights
    <name>/<version>.manifest                   their encoded protocol Manifest
    <name>/<version>.subset-<hash>.safetensors  cached partial copies for offers
    <name>/<version>.subset-<hash>.manifest     and their manifests
    .tmp/                                       files being written

Every version is one row of the ``models`` table. Its ``path`` column is
the safetensors path relative to the root, so the data directory can move.
A version is written in this order: temp files in ``.tmp/``, fsync,
``os.replace`` into place, fsync of the folder, and only then the row. A
crash can leave a file without a row, which the next version of that name
overwrites, but never a row without its files.

Every method blocks on disk I/O and hashing, so trio code calls them through
``trio.to_thread.run_sync``. Methods are safe to call from several threads
at once: a lock serialises the writers of versions. torch is imported only
by methods that handle tensors (`add_tensors`, `load_tensors`, subsets) and
by the check against a task's model, so ``import node.models`` stays small.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.store import Database
from node.weightfiles import (
    ModelError,
    WeightsFile,
    check_readable,
    copy_durably,
    file_manifest,
    fsync_path,
    inspect_file,
    remove_quietly,
    temp_file,
    write_durably,
)
from protocol import limits
from protocol.codec import decode_as, encode
from protocol.errors import RemoteProtocolError
from protocol.manifest import SafetensorsHeader, check_manifest, decode_manifest, parse_header
from protocol.messages import Manifest

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["SOURCES", "CommitHook", "DestinationExists", "ModelError", "ModelStore", "ModelVersion", "parse_ref"]

logger = logging.getLogger(__name__)


class DestinationExists(ModelError):
    """An export whose destination file exists, without ``overwrite=True``."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} already exists; choose another path or pass overwrite=True")
        self.path = path

SOURCES = ("import", "init", "train", "merge", "purchase")

# A name is also a folder name, so it starts with a letter or digit: that
# rules out ".", ".." and the store's own ".tmp".
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1 to 64 ASCII letters, digits, '-', '_' or '.', starting with a letter or digit"
VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,17}")

_COLUMNS = (
    "name, version, task, family, root, total_bytes, chunk_size, path, created_ms, "
    "source, parent, deal_id, metrics"
)


@dataclass(frozen=True)
class ModelVersion:
    """One stored version of a named model."""

    name: str
    version: int
    task: str  # "" when the weights belong to no known task
    family: bytes  # protocol.manifest.family_hash of the tensor names, dtypes and shapes
    root: bytes  # manifest root, the hash an offer signs
    total_bytes: int
    chunk_size: int
    path: Path  # absolute path of the safetensors file
    manifest_path: Path
    created_ms: int
    source: str  # one of SOURCES
    parent: int | None  # the version of the same name this one was trained or merged from
    deal_id: bytes | None  # the deal that paid for a purchase or merge
    metrics: dict[str, float] = field(hash=False)

    @property
    def ref(self) -> str:
        """Reference that `ModelStore.get` accepts: ``name@version``."""
        return f"{self.name}@{self.version}"


# Extra statements that must commit together with a new version's row (a
# ledger entry and a deal update, say). The hook runs inside the store's
# transaction; raising from it rolls the row back.
CommitHook = Callable[[sqlite3.Connection, ModelVersion], None]


def check_name(name: str) -> str:
    """Return ``name`` when it is a valid model name; raise ModelError otherwise."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise ModelError(f"model name {name!r} is invalid; use {NAME_RULE}")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """Split ``"name"`` or ``"name@N"`` into the name and the version (None for latest)."""
    name, separator, version_text = ref.partition("@")
    check_name(name)
    if not separator:
        return name, None
    if VERSION_PATTERN.fullmatch(version_text) is None:
        raise ModelError(
            f"model reference {ref!r} is invalid; write name@N with a version N of 1 or more, "
            "or just the name for the latest version"
        )
    return name, int(version_text)


class ModelStore:
    """Named models with numbered versions: files under ``root``, rows in ``db``.

    ``chunk_size`` is the chunk size of the manifests this store writes,
    from ``[transfer] chunk_size``.
    """

    def __init__(self, root: Path, db: Database, *, chunk_size: int) -> None:
        if not limits.MIN_CHUNK_SIZE <= chunk_size <= limits.MAX_CHUNK_SIZE:
            raise ValueError(
                f"chunk_size is {chunk_size}; it must be in "
                f"[{limits.MIN_CHUNK_SIZE}, {limits.MAX_CHUNK_SIZE}] bytes"
            )
        # Absolute, so the paths in ModelVersion stay valid after a chdir.
        self.root = root.absolute()
        self.chunk_size = chunk_size
        self._db = db
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._subset_lock = threading.Lock()

    # Adding versions

    def import_file(self, path: Path, *, name: str, task: str = "", now_ms: int) -> ModelVersion:
        """Copy a user's safetensors file into the store as the next version of ``name``.

        The copy, not the original, is validated and stored, so a file that
        changes during the import cannot slip past the checks. Pickle and
        PyTorch checkpoints are rejected with instructions to convert them.
        When ``task`` names a registered task, the tensors must match its
        model exactly. Raises ModelError and stores nothing on any problem.
        """
        _check_arguments(name, task, "import", now_ms)
        # The header check is cheap and rejects checkpoints before the copy.
        check_readable(path)
        staged = temp_file(self._tmp, ".safetensors")
        try:
            try:
                copy_durably(path, staged)
            except OSError as exc:
                raise ModelError(f"cannot copy {path} into {self.root}: {exc.strerror}") from None
            info = inspect_file(staged, self.chunk_size, str(path))
            _check_task_fit(info.header, task, str(path))
            return self._commit(
                staged, info, name=name, task=task, source="import", parent=None,
                deal_id=None, metrics={}, now_ms=now_ms, commit_with=None,
            )
        finally:
            remove_quietly(staged)

    def add_tensors(
        self,
        name: str,
        tensors: Mapping[str, Tensor],
        *,
        task: str,
        source: str,
        parent: int | None = None,
        deal_id: bytes | None = None,
        metrics: Mapping[str, float] | None = None,
        now_ms: int,
        commit_with: CommitHook | None = None,
    ) -> ModelVersion:
        """Save tensors (moved to the CPU, contiguous) as the next version of ``name``.

        ``parent`` must be an existing version of ``name``. ``commit_with``
        runs in the transaction that inserts the row.
        """
        _check_arguments(name, task, source, now_ms)
        clean_metrics = _check_metrics(metrics or {})
        self._check_parent(name, parent)
        if not tensors:
            raise ModelError(f"no tensors to store for model {name!r}; pass at least one tensor")
        from safetensors.torch import save_file

        cpu_tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
        staged = temp_file(self._tmp, ".safetensors")
        try:
            try:
                save_file(cpu_tensors, str(staged))
            except (RuntimeError, ValueError) as exc:  # shared storage, non-string names
                raise ModelError(f"cannot save the tensors of model {name!r}: {exc}") from None
            fsync_path(staged)
            info = inspect_file(staged, self.chunk_size, f"the tensors of model {name!r}")
            _check_task_fit(info.header, task, f"the tensors of model {name!r}")
            return self._commit(
                staged, info, name=name, task=task, source=source, parent=parent,
                deal_id=deal_id, metrics=clean_metrics, now_ms=now_ms,
                commit_with=commit_with,
            )
        finally:
            remove_quietly(staged)

    def add_file(
        self,
        name: str,
        path: Path,
        *,
        task: str,
        source: str = "purchase",
        parent: int | None = None,
        deal_id: bytes | None = None,
        metrics: Mapping[str, float] | None = None,
        now_ms: int,
        commit_with: CommitHook | None = None,
    ) -> ModelVersion:
        """Move an already written safetensors file into the store as the next version.

        Meant for weights that the node assembled itself, such as a purchase.
        The file is validated where it is. It is deleted from ``path`` only
        once the version is committed, so after any exception it is still
        there. The store links to it, or copies it when hard links fail
        (another file system, say), so the file must not change meanwhile.
        """
        _check_arguments(name, task, source, now_ms)
        clean_metrics = _check_metrics(metrics or {})
        self._check_parent(name, parent)
        info = inspect_file(path, self.chunk_size)
        _check_task_fit(info.header, task, str(path))
        staged = temp_file(self._tmp, ".safetensors")
        try:
            staged.unlink()  # link() needs a free name
            try:
                os.link(path, staged)
                fsync_path(staged)
            except OSError:
                copy_durably(path, staged)
            model = self._commit(
                staged, info, name=name, task=task, source=source, parent=parent,
                deal_id=deal_id, metrics=clean_metrics, now_ms=now_ms,
                commit_with=commit_with,
            )
        finally:
            remove_quietly(staged)
        try:
            path.unlink()
        except OSError as exc:
            # The version is committed, so a leftover input file is only clutter.
            logger.warning("Stored %s but could not delete %s: %s", model.ref, path, exc)
        return model

    # Looking versions up

    def get(self, ref: str) -> ModelVersion:
        """Return the version that ``"name"`` (the latest) or ``"name@N"`` names.

        Raises ModelError listing the known names or versions when it does not exist.
        """
        name, version = parse_ref(ref)
        if version is None:
            found = self.latest(name)
        else:
            row = self._db.query_one(
                f"SELECT {_COLUMNS} FROM models WHERE name = ? AND version = ?", (name, version)
            )
            found = None if row is None else self._from_row(row)
        if found is not None:
            return found
        versions = [
            int(row["version"])
            for row in self._db.query("SELECT version FROM models WHERE name = ? ORDER BY version", (name,))
        ]
        if versions:
            raise ModelError(
                f"model {name!r} has no version {version}; its versions are "
                f"{', '.join(map(str, versions))}"
            )
        names = self.names()
        if names:
            raise ModelError(f"unknown model {name!r}; known models: {', '.join(names)}")
        raise ModelError(f"unknown model {name!r}; no models are stored yet, so import one first")

    def latest(self, name: str) -> ModelVersion | None:
        """Return the highest version of ``name``, or None when it has none."""
        row = self._db.query_one(
            f"SELECT {_COLUMNS} FROM models WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
        )
        return None if row is None else self._from_row(row)

    def names(self) -> builtins.list[str]:
        """Return the names of all stored models, sorted."""
        return [str(row["name"]) for row in self._db.query("SELECT DISTINCT name FROM models ORDER BY name")]

    def list(self) -> builtins.list[ModelVersion]:
        """Return every stored version, sorted by name and version."""
        rows = self._db.query(f"SELECT {_COLUMNS} FROM models ORDER BY name, version")
        return [self._from_row(row) for row in rows]

    def latest_of_family(self, family: bytes, *, task: str = "") -> ModelVersion | None:
        """Return the newest version of ``family`` across all names, or None.

        Versions of ``task`` come first (when it is not empty), then versions
        of any other task, then versions without a task: a buyer merges into
        a model of its own task, never into an imported copy that has none.
        Within a group, newest means the highest ``created_ms``; the later
        insert wins a tie.
        """
        row = self._db.query_one(
            f"SELECT {_COLUMNS} FROM models WHERE family = ? "
            "ORDER BY (? != '' AND task = ?) DESC, task != '' DESC, created_ms DESC, rowid DESC LIMIT 1",
            (family, task, task),
        )
        return None if row is None else self._from_row(row)

    def version_for_deal(self, deal_id: bytes) -> ModelVersion | None:
        """Return the version a purchase created (merged or bought outright), or None."""
        row = self._db.query_one(
            f"SELECT {_COLUMNS} FROM models WHERE deal_id = ? ORDER BY rowid DESC LIMIT 1", (deal_id,)
        )
        return None if row is None else self._from_row(row)

    # Reading versions

    def export(self, ref: ModelVersion | str, dest: Path, *, overwrite: bool = False) -> Path:
        """Copy a version's safetensors file to ``dest`` atomically and return the path written.

        When ``dest`` is a folder the file is named ``<name>-<version>.safetensors``.
        An existing file is replaced only with ``overwrite=True``. The copy
        is readable by its owner only (mode 0600, from tempfile.mkstemp).
        """
        model = self._resolve(ref)
        if dest.is_dir():
            dest = dest / f"{model.name}-{model.version}.safetensors"
        if not dest.parent.is_dir():
            raise ModelError(f"folder {dest.parent} does not exist; create it or pick another destination")
        if dest.exists() and not overwrite:
            raise DestinationExists(dest)
        temp = temp_file(dest.parent, ".safetensors", prefix=f".{dest.name}.")
        try:
            copy_durably(model.path, temp)
            if overwrite:
                os.replace(temp, dest)
            else:
                # link() fails when dest exists, so a file created since the
                # check above is not overwritten.
                try:
                    os.link(temp, dest)
                except FileExistsError:
                    raise DestinationExists(dest) from None
            fsync_path(dest.parent, directory=True)
        finally:
            remove_quietly(temp)
        return dest

    def load_tensors(self, version: ModelVersion | str, device: str = "cpu") -> dict[str, Tensor]:
        """Load every tensor of a version onto ``device`` ("cpu", "cuda:0", ...)."""
        from safetensors.torch import load_file

        model = self._resolve(version)
        return load_file(str(model.path), device=device)

    def read_manifest(self, version: ModelVersion | str) -> Manifest:
        """Read a version's manifest and check it against the root in its row."""
        model = self._resolve(version)
        return self._read_manifest_file(model.manifest_path, model.root)

    # Subsets for partial offers

    def subset_file(self, version: ModelVersion | str, names: Sequence[str]) -> Path:
        """Return a safetensors file that contains only the tensors ``names`` of a version.

        The file is written once, next to the version, and reused for the
        same set of names. Only the chosen tensors are read into memory.
        Empty ``names``, or names covering every tensor, mean the whole
        model (as in an offer), and the version's own file is returned.
        Raises ModelError listing names that the version lacks.
        """
        return self._subset(self._resolve(version), names)[0]

    def subset_manifest(self, version: ModelVersion | str, names: Sequence[str]) -> Manifest:
        """Return the manifest of `subset_file` for the same arguments."""
        model = self._resolve(version)
        path, manifest_path = self._subset(model, names)
        if path == model.path:
            return self._read_manifest_file(model.manifest_path, model.root)
        return decode_manifest_file(manifest_path)

    def _subset(self, model: ModelVersion, names: Sequence[str]) -> tuple[Path, Path]:
        chosen = sorted(set(names))
        header = self._header(model)
        known = {info.name for info in header.tensors}
        unknown = [name for name in chosen if name not in known]
        if unknown:
            raise ModelError(
                f"model {model.ref} has no tensors named {', '.join(map(repr, unknown))}; "
                f"its tensors are {', '.join(sorted(known))}"
            )
        if not chosen or len(chosen) == len(known):
            return model.path, model.manifest_path

        digest = hashlib.sha256(json.dumps(chosen).encode("utf-8")).hexdigest()[:16]
        stem = f"{model.version}.subset-{digest}"
        path = model.path.with_name(f"{stem}.safetensors")
        manifest_path = model.path.with_name(f"{stem}.manifest")
        with self._subset_lock:
            # Both files are replaced into place, the manifest last, so when it
            # exists the weights beside it are complete.
            if not (path.exists() and manifest_path.exists()):
                self._write_subset(model, chosen, path, manifest_path)
        return path, manifest_path

    def _write_subset(
        self, model: ModelVersion, chosen: builtins.list[str], path: Path, manifest_path: Path
    ) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        staged = temp_file(self._tmp, ".safetensors")
        manifest_temp = temp_file(self._tmp, ".manifest")
        try:
            with safe_open(str(model.path), framework="pt") as handle:
                tensors = {name: handle.get_tensor(name) for name in chosen}
                metadata = handle.metadata()
            save_file(tensors, str(staged), metadata=metadata)
            fsync_path(staged)
            manifest = file_manifest(staged, self.chunk_size)
            write_durably(manifest_temp, encode(manifest))
            os.replace(staged, path)
            os.replace(manifest_temp, manifest_path)
            fsync_path(path.parent, directory=True)
        finally:
            remove_quietly(staged)
            remove_quietly(manifest_temp)

    # Internals

    def _commit(
        self,
        staged: Path,
        info: WeightsFile,
        *,
        name: str,
        task: str,
        source: str,
        parent: int | None,
        deal_id: bytes | None,
        metrics: Mapping[str, float],
        now_ms: int,
        commit_with: CommitHook | None,
    ) -> ModelVersion:
        """Move a validated file in ``.tmp`` into place and insert its row."""
        manifest_temp = temp_file(self._tmp, ".manifest")
        try:
            write_durably(manifest_temp, encode(info.manifest))
            with self._write_lock:
                row = self._db.query_one("SELECT MAX(version) AS top FROM models WHERE name = ?", (name,))
                version = 1 if row is None or row["top"] is None else int(row["top"]) + 1
                folder = self.root / name
                created = not folder.exists()
                folder.mkdir(exist_ok=True)
                weights_path = folder / f"{version}.safetensors"
                manifest_path = folder / f"{version}.manifest"
                os.replace(staged, weights_path)
                os.replace(manifest_temp, manifest_path)
                fsync_path(folder, directory=True)
                if created:
                    fsync_path(self.root, directory=True)
                model = ModelVersion(
                    name=name,
                    version=version,
                    task=task,
                    family=info.family,
                    root=info.root,
                    total_bytes=info.manifest.total_bytes,
                    chunk_size=info.manifest.chunk_size,
                    path=weights_path,
                    manifest_path=manifest_path,
                    created_ms=now_ms,
                    source=source,
                    parent=parent,
                    deal_id=deal_id,
                    metrics=dict(metrics),
                )
                with self._db.transaction() as connection:
                    self._insert_row(connection, model)
                    if commit_with is not None:
                        commit_with(connection, model)
            return model
        finally:
            remove_quietly(manifest_temp)

    def _check_parent(self, name: str, parent: int | None) -> None:
        # Versions are never deleted, so a parent that exists now still
        # exists when the row is inserted.
        if parent is None:
            return
        row = self._db.query_one("SELECT 1 FROM models WHERE name = ? AND version = ?", (name, parent))
        if row is None:
            raise ModelError(
                f"parent version {parent} of model {name!r} does not exist; "
                "pass an existing version or None"
            )

    def _insert_row(self, connection: sqlite3.Connection, model: ModelVersion) -> None:
        connection.execute(
            f"INSERT INTO models ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                model.name,
                model.version,
                model.task,
                model.family,
                model.root,
                model.total_bytes,
                model.chunk_size,
                model.path.relative_to(self.root).as_posix(),
                model.created_ms,
                model.source,
                model.parent,
                model.deal_id,
                json.dumps(model.metrics, sort_keys=True, allow_nan=False),
            ),
        )

    def _from_row(self, row: sqlite3.Row) -> ModelVersion:
        path = self.root / str(row["path"])
        return ModelVersion(
            name=str(row["name"]),
            version=int(row["version"]),
            task=str(row["task"]),
            family=bytes(row["family"]),
            root=bytes(row["root"]),
            total_bytes=int(row["total_bytes"]),
            chunk_size=int(row["chunk_size"]),
            path=path,
            manifest_path=path.with_suffix(".manifest"),
            created_ms=int(row["created_ms"]),
            source=str(row["source"]),
            parent=None if row["parent"] is None else int(row["parent"]),
            deal_id=None if row["deal_id"] is None else bytes(row["deal_id"]),
            metrics={str(key): float(value) for key, value in json.loads(row["metrics"]).items()},
        )

    def _resolve(self, version: ModelVersion | str) -> ModelVersion:
        return version if isinstance(version, ModelVersion) else self.get(version)

    def _header(self, model: ModelVersion) -> SafetensorsHeader:
        return parse_header(self._read_manifest_file(model.manifest_path, model.root).header)

    @staticmethod
    def _read_manifest_file(path: Path, root: bytes) -> Manifest:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read manifest {path}: {exc.strerror}") from None
        try:
            return decode_manifest(data, root)[0]
        except RemoteProtocolError as exc:
            raise ModelError(
                f"manifest {path} is corrupt ({exc.detail}); import the model again"
            ) from None


def decode_manifest_file(path: Path) -> Manifest:
    """Read an encoded Manifest from ``path``, checking only its own consistency."""
    try:
        manifest = decode_as(Manifest, path.read_bytes())
        check_manifest(manifest)
    except OSError as exc:
        raise ModelError(f"cannot read manifest {path}: {exc.strerror}") from None
    except RemoteProtocolError as exc:
        raise ModelError(f"manifest {path} is corrupt ({exc.detail}); delete it to rebuild it") from None
    return manifest


def _check_arguments(name: str, task: str, source: str, now_ms: int) -> None:
    """Raise ModelError for an invalid name, task name, source or time of a new version."""
    check_name(name)
    if len(task.encode("utf-8")) > limits.MAX_TASK_NAME:
        raise ModelError(
            f"task name {task[:80]!r} is longer than {limits.MAX_TASK_NAME} bytes; use a registered task name"
        )
    if source not in SOURCES:
        raise ModelError(f"source {source!r} is invalid; use one of {', '.join(SOURCES)}")
    if now_ms < 0:
        raise ModelError(f"now_ms is {now_ms}; pass milliseconds since the Unix epoch")


def _check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Return ``metrics`` with float values; raise ModelError for a non-finite number."""
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not isinstance(key, str) or not math.isfinite(number):
            raise ModelError(f"metric {key!r} is {value!r}; metrics must map names to finite numbers")
        clean[key] = number
    return clean


# Tensor layout of each registered task's model: name -> (dtype code, shape).
_task_layouts: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
_task_layouts_lock = threading.Lock()


def task_layout(task: str) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """Return the safetensors dtype and shape of every tensor of a task's model.

    Returns None when no task of that name is registered. Imports torch.
    """
    from node.tasks import get_task, task_names

    if task not in task_names():
        return None
    with _task_layouts_lock:
        layout = _task_layouts.get(task)
        if layout is None:
            params = get_task(task).initial_params(0)
            layout = {name: (_dtype_code(t.dtype), tuple(t.shape)) for name, t in params.items()}
            _task_layouts[task] = layout
    return layout


def layout_problems(
    header: SafetensorsHeader,
    layout: Mapping[str, tuple[str, tuple[int, ...]]],
    *,
    allow_subset: bool,
) -> builtins.list[str]:
    """List every tensor of ``header`` that does not fit ``layout``, one problem each."""
    problems: builtins.list[str] = []
    present = header.by_name()
    if not allow_subset:
        for name, (dtype, shape) in sorted(layout.items()):
            if name not in present:
                problems.append(f"{name}: missing; expected dtype {dtype} and shape {shape}")
    for info in header.tensors:
        expected = layout.get(info.name)
        if expected is None:
            problems.append(f"{info.name}: unexpected tensor; the model has no tensor of that name")
            continue
        if info.dtype != expected[0]:
            problems.append(f"{info.name}: dtype is {info.dtype}, expected {expected[0]}")
        if info.shape != expected[1]:
            problems.append(f"{info.name}: shape is {info.shape}, expected {expected[1]}")
    return problems


def _check_task_fit(header: SafetensorsHeader, task: str, origin: str) -> None:
    """Raise ModelError unless ``header`` matches a registered task's model exactly.

    Weights of a task that is not registered here are stored unchecked.
    """
    if not task:
        return
    layout = task_layout(task)
    if layout is None:
        return
    problems = layout_problems(header, layout, allow_subset=False)
    if problems:
        raise ModelError(
            f"{origin} does not fit the model of task {task!r}: {'; '.join(problems)}. "
            "Store the task model's state_dict() tensors, or store the file without a task",
            problems,
        )


def _dtype_code(dtype: Any) -> str:
    """Return the safetensors code ("F32", "I64", ...) of a torch dtype."""
    return _dtype_codes().get(dtype, str(dtype))


@functools.cache
def _dtype_codes() -> dict[Any, str]:
    import torch

    return {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
        torch.complex64: "C64",
        torch.float8_e4m3fn: "F8_E4M3",
        torch.float8_e5m2: "F8_E5M2",
    }
