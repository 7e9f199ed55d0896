"""The ``hdfunc`` command line: ``hdfunc demo | verify | study ...``.

Each subcommand lives in its own module and takes its own arguments (``hdfunc study --help``).
Nothing here imports torch: a subcommand's module is imported only when it runs, and those
modules import torch only after their arguments are parsed, so ``--help`` answers at once.
"""

from __future__ import annotations

import importlib
import inspect
import sys

from hdfunc._version import __version__

SUBCOMMANDS = {
    "demo": ("hdfunc.demo:main", "the main job: verification summary and a small multi-seed study"),
    "verify": ("verification.cli:main",
               "check every hypergradient against autodiff (also: python -m verification)"),
    "study": ("hdfunc.studies.cli:main", "batched multi-seed studies with vmap"),
}


def usage() -> str:
    """The top-level help: the commands of :data:`SUBCOMMANDS` and the options.

    Returns:
        The help text.
    """
    lines = ["usage: hdfunc [--version] <command> [options]", "",
             "Hypergradient descent as functional update rules on torch.func.", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "options:", "  -h, --help  show this message and exit",
              "  --version   print the version of hdfunc and exit", "",
              "hdfunc <command> --help for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``hdfunc``: print the help or the version, or run the subcommand ``argv[0]`` with
    the rest of ``argv`` (its module is imported only then).

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 after the help or the version, 2 for an unknown command, else the
        subcommand's (0 when it returns None).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"hdfunc {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"hdfunc: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name = SUBCOMMANDS[name][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    if "prog" in inspect.signature(function).parameters:  # its --help says "hdfunc <name>"
        return int(function(rest, prog=f"hdfunc {name}") or 0)
    return int(function(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
