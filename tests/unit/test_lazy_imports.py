"""Tests that the daemon's model, worker and evaluation modules import without torch."""

from __future__ import annotations

import subprocess
import sys


def test_modules_import_without_torch() -> None:
    # A fresh interpreter, because this test process has imported torch already.
    code = (
        "import sys, node.models, node.workers, node.evaluate\n"
        "loaded = [m for m in ('torch', 'sklearn', 'scipy') if m in sys.modules]\n"
        "print(','.join(loaded))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )

    assert result.stdout.strip() == ""


def test_task_check_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "from node.config import TaskSection, validate_task\n"
        "validate_task(TaskSection(name='digits', split='iid'))\n"
        "loaded = [m for m in ('torch', 'sklearn') if m in sys.modules]\n"
        "print(','.join(loaded))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )

    assert result.stdout.strip() == ""
