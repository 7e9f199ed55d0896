"""Command line of the verification suite (``python -m verification`` / ``hdfunc verify``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

# The problems of verification.problems (tests/test_package.py checks that they agree), spelled
# out here so that --help answers without importing torch.
PROBLEM_NAMES = ("quadratic", "logistic", "mlp", "rosenbrock", "tiny_quadratic", "relu_mlp")


def parser(prog: str = "python -m verification") -> argparse.ArgumentParser:
    """The argument parser of the suite's command line (built without importing torch).

    Args:
        prog: the program name its ``--help`` shows.

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(
        prog=prog,
        description="Check every hypergradient hdfunc uses against the exact derivative computed "
                    "by torch.func (reverse mode, forward mode, finite differences), through one "
                    "step, K unrolled steps and the HD updates themselves; certify each whole "
                    "rule (hypergradient, rate law, applied rate, step) against an autodiff "
                    "replay of the definition of HD; plus equivalences with the base rules, "
                    "torch.optim and vmap. Exit status: 0 all passed, 1 a comparison failed, "
                    "3 none failed but some were inconclusive, 2 bad arguments, 130 interrupted.")
    p.add_argument("--quick", action="store_true",
                   help="a representative subset (under a minute on 2 CPU cores)")
    p.add_argument("--rule", action="append", default=[], metavar="package.module:factory",
                   help="verify your own rule instead of the built-in ones: factory(lr, "
                        "hypergrad_lr) returns a rule whose state holds an HD node "
                        "(docs/writing-a-rule.md); may be repeated")
    p.add_argument("--only", metavar="GLOB", help="only rules whose name matches, e.g. 'adam*'")
    p.add_argument("--problems", nargs="+", choices=PROBLEM_NAMES, metavar="NAME",
                   help=f"a subset of the problems ({', '.join(PROBLEM_NAMES)})")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda when available for the full run, else cpu)")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                   help="dtype of the problems (default float64; float32 skips finite differences)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads (default 1: the problems are tiny, and more threads "
                        "only contend for them)")
    p.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the report as Markdown (for docs/)")
    p.add_argument("--failures-only", action="store_true",
                   help="print only the failing rows of the table")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress report (a bar on a terminal, plain lines otherwise)")
    return p


def main(argv: Optional[list[str]] = None, prog: str = "python -m verification") -> int:
    """Run the suite from the command line: print the table, the summary by check, the
    findings and the diagnoses, list failures and inconclusive checks on stderr, and write the
    JSON / Markdown reports asked for.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).
        prog: the program name shown in ``--help``, messages and the report.

    Returns:
        The exit status: the report's (0 all passed, 1 a comparison failed, 3 some were
        inconclusive, 130 interrupted), or 2 for an unavailable device or a bad rule or option.

    Raises:
        SystemExit: from argparse, on ``--help`` or bad arguments.
    """
    args = parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    from verification.catalog import load_factory, user_spec
    from verification.suite import run

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        print(f"{prog}: device {device!r} is not available: {error}", file=sys.stderr)
        return 2
    try:
        rules = [user_spec(load_factory(t), name=t) for t in args.rule] or None
        report = run(rules, quick=args.quick, only=args.only, problems=args.problems,
                     device=device, dtype=getattr(torch, args.dtype),
                     progress=not args.no_progress,
                     threads=args.threads)
    except (ValueError, TypeError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2

    report.meta["command"] = " ".join([prog] + list(
        sys.argv[1:] if argv is None else argv))
    print(report.table(failures_only=args.failures_only))
    if report.outcomes:
        print("\nsummary by check:\n" + report.summary_table())
    findings = report.findings_table()
    if findings:
        print("\n" + findings)
    for outcome in report.failures[:50]:
        print(outcome.message, file=sys.stderr)
    if len(report.failures) > 50:
        print(f"... and {len(report.failures) - 50} more failures (see --json)", file=sys.stderr)
    for outcome in report.inconclusives[:20]:
        print(outcome.message, file=sys.stderr)
    if len(report.inconclusives) > 20:
        print(f"... and {len(report.inconclusives) - 20} more inconclusive (see --json)",
              file=sys.stderr)
    diagnoses = report.diagnoses()
    if diagnoses:
        print("\ndiagnosis (the first part of the HD step that differs from its definition):\n"
              + "\n".join(f"  {d}" for d in diagnoses))
    if args.json:
        report.write_json(args.json)
    if args.markdown:
        report.write_markdown(args.markdown)
    print("\n" + report.summary())
    return report.exit_status


if __name__ == "__main__":
    raise SystemExit(main())
