"""Entry point of scripts/bench: run the named benchmarks, or all of them."""

from __future__ import annotations

import argparse
import importlib
import sys

# Benchmark name -> module under scripts.benchmarks with a `main(args) -> Result`.
BENCHMARKS = {
    "protocol": "protocol_bench",
    "gossip": "gossip_bench",
    "devnet": "devnet_bench",
    "transfer": "transfer_bench",
    "merge": "merge_bench",
    "trade": "trade_bench",
    "scale": "scale_bench",
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--no-record", action="store_true", help="print results without writing docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(BENCHMARKS))
        return 0
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    from scripts.benchmarks.record import record, render

    for name in args.names or list(BENCHMARKS):
        module = importlib.import_module(f"scripts.benchmarks.{BENCHMARKS[name]}")
        print(f"== {name}", flush=True)
        try:
            result = module.main()
        except KeyboardInterrupt:
            print(f"Interrupted during the {name} benchmark; its figures were not recorded.", file=sys.stderr)
            return 130
        command = f"./scripts/bench {name}"
        print(render(result, command))
        if not args.no_record:
            record(result, command)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
