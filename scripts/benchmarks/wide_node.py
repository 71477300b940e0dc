"""`pmarket` with the benchmark task "wide" registered, for `scripts/bench trade`.

    python -m scripts.benchmarks.wide_node node start --data-dir DIR ...
"""

from __future__ import annotations

import sys

from node.cli import main
from node.tasks import register_task
from scripts.benchmarks.wide_task import WideTask

if __name__ == "__main__":
    register_task("wide", WideTask)
    sys.exit(main(sys.argv[1:]))
