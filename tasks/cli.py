"""`deepnets`: small conveniences around the pipeline (the pipeline itself runs with `dvc repro`).

    deepnets params [FILE]   validate params.yaml and print the resolved values (exit 2 if bad)
    deepnets models          list the registered networks
    deepnets report          print the last run's report (reports/summary.md)
    deepnets compare [REV..] tabulate results across commits, tags, branches, experiments
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _params(args: argparse.Namespace) -> int:
    from tasks import config

    return config.main([str(args.file)])


def _models(args: argparse.Namespace) -> int:
    from nets import get_entry, list_models

    for name in list_models():
        entry = get_entry(name)
        print(f"{name:<22} {entry.doc}")
    return 0


def _report(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.exists():
        print(f"error: {path} does not exist yet; run `dvc repro` first", file=sys.stderr)
        return 1
    print(path.read_text(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:  # its own parser (flows.compare)
        from flows.compare import main as compare

        return compare(argv[1:])
    parser = argparse.ArgumentParser(prog="deepnets", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    params = commands.add_parser("params", help="validate params.yaml and print it resolved")
    params.add_argument("file", nargs="?", default="params.yaml")
    params.set_defaults(run=_params)
    commands.add_parser("models", help="list the registered networks").set_defaults(run=_models)
    report = commands.add_parser("report", help="print the last run's report")
    report.add_argument("file", nargs="?", default="reports/summary.md")
    report.set_defaults(run=_report)
    commands.add_parser("compare", help="tabulate results across revisions (see --help)")
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
