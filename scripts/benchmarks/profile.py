"""Sample running processes with py-spy and sort their CPU time into categories.

py-spy is not a dependency of pmarket. A benchmark that finds no `py-spy`
next to the Python it runs on, or on PATH, skips its profile and notes that
on the page (install it with `.venv/bin/pip install py-spy`).

py-spy records a stack per thread per sample, leaving out threads that it
sees sleeping. Time spent in a C function (the cipher, a socket call, a
file write) counts towards the Python line that called it, so each sample
is sorted by its innermost Python line, read from the source file.
"""

from __future__ import annotations

import collections
import linecache
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from scripts.benchmarks.record import ROOT

SAMPLE_RATE = 200  # samples per second and thread
# Samples of a thread in epoll or of an idle worker thread: py-spy counts a
# thread that is runnable but waiting for a CPU as busy, so these are not
# all idle time, but they are no work either.
WAITING = "waiting (epoll, idle worker threads)"

# Category, then (path part, line text part) pairs that put a line in it.
# The first category with a match wins. An empty part matches anything.
CATEGORIES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("ChaCha20-Poly1305", (("libp2p_tuning.py", "encrypt_into"), ("libp2p_tuning.py", "decrypt"),
                           ("noise/", "crypt"))),
    ("BLAKE3 hashing", (("protocol/manifest.py", "blake3"),)),
    ("socket calls (kernel copies)", (("trio/_socket.py", ""),)),
    ("file reads and writes", (("node/chunks.py", "pwrite"), ("node/chunks.py", "fdatasync"),
                               ("node/seller.py", "madvise"), ("trio/_threads.py", "sync_fn"))),
    ("memory copies", (("", "target[:count] ="), ("", "target[filled"), ("", ".extend("),
                       ("", "bytes(self._plain"))),
    (WAITING, (("trio/_core/_io_epoll.py", "epoll.poll"), ("trio/_core/_thread_cache.py", "acquire(timeout"))),
    ("trio scheduling", (("trio/", ""), ("outcome/", ""))),
    ("Noise and Yamux in Python", (("libp2p/", ""), ("node/libp2p_tuning.py", ""))),
    ("pmarket Python", (("node/", ""), ("protocol/", ""))),
)


def find_py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


class Sampler:
    """py-spy recording one process until `stop`."""

    def __init__(self, py_spy: str, pid: int, output: Path) -> None:
        self.output = output
        self.process = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE), "--format", "raw",
             "--nonblocking", "--output", str(output)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        """Stop sampling (py-spy writes its file on SIGINT) and wait for the file."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _source_line(frame: str) -> tuple[str, str]:
    """Return (path, line text) for a py-spy frame such as `read (trio/_socket.py:1050)`."""
    location = frame.rsplit("(", 1)[-1].rstrip(")")
    path, _, number = location.rpartition(":")
    if not number.isdigit():
        return path, ""
    for base in (ROOT, Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["stdlib"])):
        candidate = base / path
        if candidate.exists():
            return path, linecache.getline(str(candidate), int(number)).strip()
    return path, ""


def categorize(raw_files: Sequence[Path]) -> dict[str, float]:
    """Share of samples per category over py-spy raw files, in percent."""
    counts: collections.Counter[str] = collections.Counter()
    for raw in raw_files:
        if not raw.exists():
            continue
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            path, text = _source_line(stack.split(";")[-1])
            counts[_category(path, text)] += int(count)
    total = sum(counts.values())
    return {name: 100.0 * count / total for name, count in counts.most_common()} if total else {}


def _category(path: str, text: str) -> str:
    for name, rules in CATEGORIES:
        for path_part, text_part in rules:
            if path_part in path and text_part in text:
                return name
    return "other"


def summary(shares: dict[str, float], limit: int = 7) -> str:
    """`a% x, b% y, ...` for the largest categories of work, then the share of waiting samples.

    The work shares are of the samples that were not waiting.
    """
    waiting = shares.get(WAITING, 0.0)
    if waiting >= 100.0:
        return "no samples of work"
    work = [(name, 100.0 * share / (100.0 - waiting)) for name, share in shares.items() if name != WAITING]
    parts = [f"{share:.0f}% {name}" for name, share in work[:limit]]
    return ", ".join(parts) + f" (and {waiting:.0f}% of all samples waiting)"
