"""The ``hdfunc`` command line: ``hdfunc demo | verify | study ...``.

Each subcommand lives in its own module and takes its own arguments (``hdfunc study --help``).
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "demo": ("hdfunc.demo:main", "the main job: verification summary and a small multi-seed study"),
    "verify": ("verification.cli:main", "check every hypergradient against autodiff (python -m verification)"),
    "study": ("hdfunc.studies.cli:main", "batched multi-seed studies with vmap"),
}


def usage() -> str:
    lines = ["usage: hdfunc <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "hdfunc <command> --help for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"hdfunc: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name = SUBCOMMANDS[name][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
