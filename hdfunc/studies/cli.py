"""``hdfunc study``: run a batched multi-seed study from the command line or a TOML study file.

    hdfunc study --problem logreg --optimizers sgd,sgd_hd,adam,adam_hd --lr0 1e-3 \\
        --seeds 8 --steps 300 --out runs/quick
    hdfunc study --config studies/quick_mnist.toml --out runs/quick [--resume]
    hdfunc study --problem logreg --optimizers adam_hd,prodigy,schedulefree_adamw,dadapt_adam,dog \
        --lr0 1e-6:1e-1:6 --lr0-of prodigy=1e-8:1e-3:6 --seeds 8 --epochs 2 --out runs/peers

Optimizers are the functional rules (vmapped over runs) and any torch.optim optimizer of
``hdfunc.studies.torch_optimizers.TORCH_OPTIMIZERS`` (torch_adam, optim_adam_hd, prodigy, ...: run
after run, on the same seeds' initialisations and minibatches); docs/peers.md.

Command-line options override the study file. Under ``torchrun`` (WORLD_SIZE > 1) the seeds are
sharded over the processes and the results merged into ``--out`` (see docs/studies.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (imported lazily at run time: --help must not import torch)
    from hdfunc.studies.config import StudyConfig

# The problems of hdfunc.studies.problems.PROBLEMS (tests/test_package.py checks that they agree),
# spelled out so that --help answers without importing torch; the study modules are imported
# after the arguments are parsed.
PROBLEM_NAMES = ("classification", "logreg", "mlp", "quadratic", "vgg")


def _floats(text: str) -> list[float]:
    """``1e-1,1e-2`` or a log-spaced grid ``1e-6:1e-1:6``."""
    if ":" in text:
        from hdfunc.studies.config import log_grid
        try:
            return log_grid(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error


def _beta(text: str) -> Any:
    """``1e-3,1e-4`` (every HD optimizer) or ``sgd_hd=1e-3,adam_hd=1e-7`` (per optimizer)."""
    if "=" not in text:
        return _floats(text)
    table: dict[str, list[float]] = {}
    for item in text.split(","):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"mix of per-optimizer and plain β in {text!r}")
        name, value = item.split("=", 1)
        table.setdefault(name.strip(), []).append(float(value))
    return table


def _seeds(text: str) -> Any:
    """``8`` (seeds 0..7), ``0-15`` (a range) or ``3,5,7`` (a list)."""
    try:
        if "," in text:
            return [int(x) for x in text.split(",") if x]
        if "-" in text:
            low, high = text.split("-", 1)
            return list(range(int(low), int(high) + 1))
        return int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"bad seeds {text!r}") from error


def _optimizers(text: str) -> list[str]:
    from hdfunc.studies.config import parse_optimizer
    names = [x.strip() for x in text.split(",") if x.strip()]
    for name in names:
        try:
            parse_optimizer(name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error
    return names


def _lr0_of(text: str) -> tuple[str, list[float]]:
    """``prodigy=1e-8:1e-3:6`` or ``dog=1e-6,1e-4``: one optimizer's own grid."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--lr0-of must be LABEL=GRID, got {text!r}")
    label, grid = text.split("=", 1)
    return label.strip(), _floats(grid)


def _option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"problem option must be key=value, got {text!r}")
    key, value = text.split("=", 1)
    from hdfunc.studies.config import _parse_value
    return key.strip(), _parse_value(value.strip())


def build_parser(prog: str = "hdfunc study") -> argparse.ArgumentParser:
    """The argument parser of ``hdfunc study``.

    Args:
        prog: the program name shown in usage and errors.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description="Batched multi-seed optimizer studies with torch.func.vmap "
        "(Baydin et al. 2018 settings by default: batch 128, weight decay 1e-4, momentum 0.9, "
        "beta 1e-3 for SGD-HD/SGDN-HD and 1e-7 for Adam-HD).")
    parser.add_argument("--config", type=Path, help="a TOML study file (options below override it)")
    parser.add_argument("--out", type=Path, help="output folder (CSV, summary JSON, plots)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted study in --out")
    parser.add_argument("--problem", choices=PROBLEM_NAMES, help="what to train")
    parser.add_argument("--problem-option", "-P", type=_option, action="append", default=[],
                        metavar="KEY=VALUE", help="problem option, e.g. -P hidden=100 -P data_dir=...")
    parser.add_argument("--data-dir", help="dataset folder, relative to the working directory (same "
                        "as -P data_dir=...; default: $HDFUNC_MNIST_DIR, else data/mnist or "
                        "../shared/data/mnist from the working directory)")
    parser.add_argument("--optimizers", type=_optimizers,
                        help="comma-separated rules, e.g. sgd,sgd_hd,adam,adam_hd or "
                             "sgd_hd:mode=multiplicative")
    parser.add_argument("--lr0", type=_floats, help="initial learning rates, e.g. 1e-1,1e-2,1e-3 or 1e-6:1e-1:6 (log-spaced)")
    parser.add_argument("--lr0-of", type=_lr0_of, action="append", default=[], metavar="LABEL=GRID",
                        help="one optimizer's own grid of the value lr0 sets (α0; d0 for Prodigy "
                             "and D-Adaptation, reps_rel for DoG), e.g. prodigy=1e-8:1e-3:6")
    parser.add_argument("--beta", type=_beta, help="hypergradient rates: 1e-3,1e-4 (or 1e-5:1e-2:4) for every HD rule, or "
                        "sgd_hd=1e-3,adam_hd=1e-7")
    parser.add_argument("--seeds", type=_seeds, help="8 (seeds 0..7), 0-15 or 3,5,7")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--steps", type=int, help="iterations per run")
    group.add_argument("--epochs", type=float, help="epochs per run (an epoch: ceil(N/batch) "
                       "steps, the last minibatch smaller; floor(N/batch) with --drop-last)")
    parser.add_argument("--drop-last", action="store_true", default=None,
                        help="epochs of full minibatches only (the remainder unused)")
    parser.add_argument("--validation-fraction", type=float, metavar="F",
                        help="hold out this share of the training data for validation (0: no "
                             "validation; default: the standard test split when training on the "
                             "training split, e.g. MNIST 60k/10k)")
    parser.add_argument("--target-loss", type=float, help="measure iterations until the "
                        "smoothed minibatch loss reaches this value")
    parser.add_argument("--target-window", type=int, help="steps averaged for --target-loss "
                        "(default 50)")
    parser.add_argument("--metric", help="metric of the printed table and paired tests: "
                        "final_loss (default), epoch_loss, val_loss, val_accuracy, best_val_loss, "
                        "iterations_to_target")
    parser.add_argument("--plot-only", type=Path, metavar="DIR", help="redraw the figures of the "
                        "finished study in DIR (and print its table); trains nothing")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--momentum", type=float)
    parser.add_argument("--device", help="cpu (default), cuda, cuda:1, ... or auto (cuda if available)")
    parser.add_argument("--dtype", choices=["float32", "float64"])
    parser.add_argument("--chunk-size", type=int, help="runs trained at once (default: what fits)")
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile the batched step")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is often "
                        "fastest for small problems or on a busy machine)")
    parser.add_argument("--log-every", type=int, help="steps between CSV rows")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0: by time)")
    parser.add_argument("--name", help="study name shown in plots")
    parser.add_argument("--no-plots", action="store_true", help="skip the figures")
    parser.add_argument("--quiet", action="store_true", help="no progress report (a bar on a "
                        "terminal, plain periodic lines when stderr is redirected)")
    return parser


FIELDS = ("problem", "optimizers", "lr0", "beta", "seeds", "steps", "epochs", "batch_size",
          "drop_last", "validation_fraction", "target_loss", "target_window", "metric",
          "weight_decay", "momentum", "device", "dtype", "chunk_size", "compile", "threads", "log_every",
          "checkpoint_every", "name")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The study of the command line: the study file (``--config``) if given, overridden by the
    options given; a relative ``data_dir`` of a study file is taken from the file's folder.

    Args:
        args: the parsed command line (:func:`build_parser`).

    Returns:
        The study's configuration.

    Raises:
        ValueError: a bad setting.
        TypeError: a setting of the wrong type.
        OSError: the study file cannot be read.
    """
    from hdfunc.studies.config import StudyConfig

    overrides = {f: getattr(args, f) for f in FIELDS if getattr(args, f) is not None}
    if args.steps is not None:
        overrides["epochs"] = None
    if args.epochs is not None:
        overrides["steps"] = None
    if args.config is not None:
        base = StudyConfig.from_toml(args.config).to_dict()  # (data_dir from the file's folder)
    else:
        base = {}
        if "steps" not in overrides and "epochs" not in overrides:
            overrides["steps"] = 200
    options = dict(base.get("problem_options", {}))
    if overrides.get("problem") not in (None, base.get("problem")):
        options = {}  # options of another problem do not carry over
    options.update(dict(args.problem_option))
    if args.data_dir:
        options["data_dir"] = args.data_dir
    if args.lr0_of:
        overrides["lr0_by_optimizer"] = {**base.get("lr0_by_optimizer", {}), **dict(args.lr0_of)}
    return StudyConfig.from_dict({**base, **overrides, "problem_options": options})


def fail(message: Any) -> int:
    """Print a one-line error (status 2: bad settings, data or files).

    Args:
        message: the error (its text is joined onto one line).

    Returns:
        2, the exit status.
    """
    text = " ".join(str(message).split())
    print(f"hdfunc study: error: {text}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None, prog: str = "hdfunc study") -> int:
    """``hdfunc study``: run (or resume) a study from the command line.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).
        prog: the program name shown in usage and errors.

    Returns:
        The exit status: 0 done, 2 bad settings, data or files, 130 interrupted.
    """
    parser = build_parser(prog)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.plot_only is not None:
        return plot_only(args)
    if args.resume and args.out is None:
        parser.error("--resume needs --out (the folder of the study to continue)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.out is None:
        parser.error("a distributed study needs --out")
    try:
        config = config_from_args(args)
    except (ValueError, TypeError) as error:
        return fail(error)
    except OSError as error:  # the study file: missing, a folder, unreadable
        return fail(f"cannot read {error.filename or args.config}: {error.strerror or error}")
    from hdfunc.studies.torch_optimizers import MissingPeerError, require_optimizers
    try:  # before any data is loaded: one line naming the extra to install
        require_optimizers(config.optimizer_specs)
    except MissingPeerError as error:
        return fail(error)
    from hdfunc.studies.results import StudyRecoveryWarning
    with warnings.catch_warnings():
        warnings.simplefilter("always", StudyRecoveryWarning)
        show_other = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *rest: Any) -> None:
            if issubclass(category, StudyRecoveryWarning):  # what --resume repaired: one line
                print(f"hdfunc study: note: {message}", file=sys.stderr)
            else:
                show_other(message, category, *rest)

        warnings.showwarning = show
        return run(args, config)


def plot_only(args: argparse.Namespace) -> int:
    """``--plot-only DIR``: redraw the figures of a finished study and print its table.

    Args:
        args: the parsed command line.

    Returns:
        The exit status: 0 done, 2 no (readable) study in DIR or a bad --metric.
    """
    from hdfunc.studies.plots import plot_study
    from hdfunc.studies.results import load_results
    from hdfunc.studies.storage import StudyError
    try:
        results = load_results(args.plot_only)
        table = results.summary_table(args.metric)
        written = [] if args.no_plots else plot_study(results, args.plot_only / "plots")
    except (StudyError, FileNotFoundError, ValueError) as error:
        return fail(error)
    print(f"\n{results.problem}\n")
    print(table)
    for path in written:
        print(path)
    return 0


def run(args: argparse.Namespace, config: StudyConfig) -> int:
    """Run the study of ``args``; errors end with one line and status 2.

    Args:
        args: the parsed command line.
        config: the study (:func:`config_from_args`).

    Returns:
        The exit status: 0 done, 2 an error, 130 interrupted.
    """
    from hdfunc.studies.data import DatasetError
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from hdfunc.studies.distributed import run_distributed
            results = run_distributed(config, args.out, resume=args.resume,
                                      progress=not args.quiet, plots=not args.no_plots)
        else:
            from hdfunc.studies.engine import run_study
            results = run_study(config, args.out, resume=args.resume, progress=not args.quiet,
                                plots=not args.no_plots)
    except (DatasetError, FileExistsError, ValueError, TypeError) as error:
        return fail(error)
    except OSError as error:  # e.g. the disk filled up: the files written so far are consistent
        where = f"; continue with --resume --out {args.out}" if args.out else ""
        return fail(f"{error.filename or 'a file'}: {error.strerror or error}{where}")
    except KeyboardInterrupt:
        where = f"; continue with --resume --out {args.out}" if args.out else ""
        print(f"\nhdfunc study: interrupted{where}", file=sys.stderr)
        return 130
    if results is not None:
        print(f"\n{results.problem}\n")
        print(results.summary_table(args.metric))
        if args.out is not None:
            print(f"\nresults in {args.out}/ (steps.csv, summary.json"
                  f"{', plots/' if not args.no_plots else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
