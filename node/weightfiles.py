"""Safetensors files on disk: validation, manifests and durable writes.

Nothing here unpickles. A PyTorch checkpoint or a pickle fails the
safetensors checks, and its first bytes then select an error message that
explains how to convert it. This module does not import torch.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import safetensors

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.manifest import (
    HEADER_PREFIX_SIZE,
    SafetensorsHeader,
    build_manifest,
    family_hash,
    manifest_root,
    parse_header,
)
from protocol.messages import Manifest

# Suffixes that PyTorch and pickle checkpoints usually carry.
CHECKPOINT_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle"})
ZIP_MAGIC = b"PK\x03\x04"  # torch.save has written zip archives since PyTorch 1.6
PICKLE_PROTO = 0x80  # the PROTO opcode that starts pickles of protocol 2 and later

CONVERSION_HINT = (
    "convert it in Python with "
    "state_dict = torch.load(path, weights_only=True) and then "
    'safetensors.torch.save_file(state_dict, "model.safetensors"), '
    "and use model.safetensors instead"
)


class ModelError(ValueError):
    """A model file, name or reference that cannot be used.

    The message names the file or value and the next step. ``problems``
    lists every individual problem when there are several (mismatching
    tensors, say), so a caller can show them one per line.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


@dataclass(frozen=True)
class WeightsFile:
    """A validated safetensors file and its manifest."""

    path: Path
    manifest: Manifest
    header: SafetensorsHeader
    family: bytes
    root: bytes


def checkpoint_kind(path: Path) -> str | None:
    """Describe ``path`` when it looks like a pickle checkpoint, else return None.

    Only call this for a file that already failed the safetensors checks: a
    valid safetensors file may start with the same bytes as a pickle,
    because its first 8 bytes are the header length.
    """
    try:
        with path.open("rb") as file:
            head = file.read(4)
    except OSError:
        return None
    if head.startswith(ZIP_MAGIC):
        return "a zip archive, the format that torch.save writes"
    if len(head) >= 2 and head[0] == PICKLE_PROTO and 2 <= head[1] <= 5:
        return f"a pickle (protocol {head[1]}), the format of pickle.dump and of torch.save before PyTorch 1.6"
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return f"not safetensors, and its suffix {path.suffix} usually marks a PyTorch or pickle checkpoint"
    return None


def _not_safetensors(path: Path, detail: str, label: str) -> ModelError:
    kind = checkpoint_kind(path)
    if kind is not None:
        return ModelError(
            f"{label} is {kind}. pmarket never unpickles files, because loading a pickle "
            f"can run arbitrary code; {CONVERSION_HINT}"
        )
    return ModelError(
        f"{label} is not a valid safetensors file ({detail}); "
        "write the weights with safetensors.torch.save_file and try again"
    )


def check_readable(path: Path, label: str | None = None) -> None:
    """Open ``path`` with the safetensors library, which reads only its header.

    Raises ModelError when the file is missing, is not safetensors, or its
    header does not describe exactly the bytes the file holds. Messages
    name the file as ``label``, by default its path.
    """
    label = label or str(path)
    if not path.is_file():
        raise ModelError(f"{label} does not exist or is not a regular file; pass a .safetensors file")
    size = path.stat().st_size
    if size < HEADER_PREFIX_SIZE:
        raise _not_safetensors(path, f"{size} bytes, fewer than the 8-byte header length", label)
    try:
        # The numpy framework opens the file without importing torch.
        with safetensors.safe_open(str(path), framework="numpy"):
            pass
    except safetensors.SafetensorError as exc:
        raise _not_safetensors(path, str(exc), label) from None
    except OSError as exc:
        raise ModelError(f"cannot read {label}: {exc.strerror}; check the path and its permissions") from None


def file_manifest(path: Path, chunk_size: int, label: str | None = None) -> Manifest:
    """Build the manifest of a safetensors file, reading it through mmap.

    The mapping lets the kernel page the file in and out, so a model larger
    than memory can be hashed. Raises ModelError when the file breaks a
    header rule of `protocol.manifest` or needs too many chunks.
    """
    label = label or str(path)
    try:
        with path.open("rb") as file:
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # mmap raises ValueError for an empty file
        raise ModelError(f"cannot map {label} into memory: {exc}; check that it is a non-empty file") from None
    view = memoryview(mapped)
    try:
        return build_manifest(view, chunk_size)
    except RemoteProtocolError as exc:
        raise _not_safetensors(path, exc.detail, label) from None
    except LocalProtocolError as exc:
        raise ModelError(f"{label}: {exc}; set a larger [transfer] chunk_size") from None
    finally:
        view.release()
        # A slice of the view that a traceback still references keeps the
        # mapping exported, and then close() raises BufferError. The mapping
        # is unmapped when the last slice is freed instead.
        with contextlib.suppress(BufferError):
            mapped.close()


def inspect_file(path: Path, chunk_size: int, label: str | None = None) -> WeightsFile:
    """Validate a safetensors file with the library and the protocol rules.

    Returns its manifest, parsed header, family and manifest root. Raises
    ModelError naming the file as ``label`` (by default its path) when
    either check fails, or when the file contains no tensors.
    """
    label = label or str(path)
    check_readable(path, label)
    manifest = file_manifest(path, chunk_size, label)
    header = parse_header(manifest.header)
    if not header.tensors:
        raise ModelError(f"{label} contains no tensors; save at least one tensor in it")
    return WeightsFile(
        path=path,
        manifest=manifest,
        header=header,
        family=family_hash(header.tensors),
        root=manifest_root(manifest),
    )


def temp_file(folder: Path, suffix: str, prefix: str = ".tmp-") -> Path:
    """Create an empty file with a unique name in ``folder`` and return its path."""
    descriptor, name = tempfile.mkstemp(dir=folder, suffix=suffix, prefix=prefix)
    os.close(descriptor)
    return Path(name)


def fsync_path(path: Path, *, directory: bool = False) -> None:
    """Flush a file's data, or a folder's entries, to stable storage."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with path.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def copy_durably(source: Path, destination: Path) -> None:
    """Copy ``source`` over ``destination`` and fsync the copy."""
    shutil.copyfile(source, destination)  # uses os.sendfile on Linux
    fsync_path(destination)


def remove_quietly(path: Path) -> None:
    """Delete ``path`` if it exists; used to clean up temp files after a failure."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
