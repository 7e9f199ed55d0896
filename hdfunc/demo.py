"""``hdfunc demo``: the main job. Trains a built-in problem with the six rules of the paper, then
runs the quick verification suite and a small batched multi-seed study, and prints what they found."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import hdfunc  # lazy: torch is imported on first use of a rule, not by --help

DESCRIPTION = ("The main job. Trains synthetic logistic regression with SGD, SGDN and Adam and "
               "their hypergradient-descent variants (the paper's six rules), runs the quick "
               "verification suite (every hypergradient against autodiff) and a small batched "
               "multi-seed study, and prints what they found.")


def logistic_regression_problem(seed: int = 0, n: int = 2048, dim: int = 50, classes: int = 10):
    """Synthetic multinomial logistic regression (linearly separable-ish Gaussian clusters)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(classes, dim, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    inputs = centers[labels] + 1.5 * torch.randn(n, dim, generator=gen)
    params = {"weight": torch.zeros(dim, classes), "bias": torch.zeros(classes)}

    def loss(p, x=inputs, y=labels):
        return torch.nn.functional.cross_entropy(x @ p["weight"] + p["bias"], y)

    return params, loss, inputs, labels


def compare_rules(steps: int = 300, batch: int = 128, seed: int = 0) -> list[dict]:
    """Each base rule against its HD variant at the paper's α_0 = 1e-3 (β as in §4)."""
    import torch
    from torch.func import grad
    params0, loss, inputs, labels = logistic_regression_problem(seed)
    rows = []
    for name in ("sgd_hd", "sgdn_hd", "adam_hd"):  # the paper's three, with its β (§4)
        info = hdfunc.rule_info(name)
        for rule in (hdfunc.rule_info(info.base).factory(1e-3),
                     info.factory(1e-3, info.paper_hypergrad_lr)):
            gen = torch.Generator().manual_seed(seed)
            params, state = params0, rule.init(params0)
            for _ in range(steps):
                idx = torch.randint(0, inputs.shape[0], (batch,), generator=gen)
                g = grad(loss)(params, inputs[idx], labels[idx])
                updates, state = rule.update(g, state, params)
                params = hdfunc.apply_updates(params, updates)
            rows.append({"rule": rule.name, "final_loss": float(loss(params)),
                         "final_lr": float(hdfunc.get_lr(state))})
    return rows


def print_rule_table(rows: list[dict]) -> None:
    """Print the rows of :func:`compare_rules` as a table: rule, final training loss, final lr.

    Args:
        rows: the rows, dicts with ``rule``, ``final_loss`` and ``final_lr``.
    """
    print(f"{'rule':<10} {'final training loss':>20} {'final lr':>12}")
    for row in rows:
        print(f"{row['rule']:<10} {row['final_loss']:>20.4f} {row['final_lr']:>12.3e}")


def verification_summary() -> int:
    """The quick verification suite, one line per check family; 0 when everything passed."""
    import verification

    report = verification.run(quick=True)
    print(report.summary_table())
    for failure in report.failures:
        print(failure.message)
    if report.findings:
        print("\nHow close is HD's greedy one-step hypergradient to the exact K-step one?")
        print(report.findings_table())
    print(report.summary())
    return 0 if report.passed else 1


def study_summary(out_dir: str | None) -> None:
    """A small batched study (8 seeds × 4 optimizers in one vmap) on a built-in problem, written
    (CSV, JSON, plots) to ``out_dir``; a finished study there is reused, not recomputed."""
    from hdfunc.studies import demo_config, print_summary, run_study

    config = demo_config()
    progress = sys.stderr.isatty()
    try:
        results = run_study(config, out_dir, resume=True, progress=progress)
    except (ValueError, OSError) as error:  # e.g. the folder holds another study
        print(f"(not writing to {out_dir}: {error}; running in memory)")
        out_dir = None
        results = run_study(config, None, progress=progress)
    print_summary(results)
    if out_dir is not None:
        files = sorted(p.relative_to(out_dir) for p in Path(out_dir).rglob("*")
                       if p.is_file() and p.suffix in (".csv", ".json", ".png"))
        print(f"results and plots in {out_dir}/: " + ", ".join(map(str, files)))


def main(argv: Optional[list[str]] = None, prog: str = "hdfunc demo") -> int:
    """Run the demo: the six rules on synthetic logistic regression, then (unless skipped)
    the quick verification suite and the small multi-seed study, each timed.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).
        prog: the program name its ``--help`` shows.

    Returns:
        The exit status: 0, or 1 when the verification suite did not pass.

    Raises:
        SystemExit: from argparse, on ``--help`` or bad arguments (e.g. ``--steps`` < 1).
    """
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("--steps", type=int, default=300, help="steps per rule (default 300)")
    parser.add_argument("--skip-verification", action="store_true",
                        help="skip the quick verification suite")
    parser.add_argument("--skip-study", action="store_true", help="skip the multi-seed study")
    parser.add_argument("--out", default="runs/demo",
                        help="folder for the study's CSV, JSON and plots (default runs/demo)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    status = 0

    print("== 1. The six rules of the paper on synthetic logistic regression (α_0 = 1e-3, batch 128)")
    start = time.perf_counter()
    print_rule_table(compare_rules(args.steps))
    print(f"({time.perf_counter() - start:.1f} s)\n")

    if not args.skip_verification:
        print("== 2. Verification: every hypergradient against autodiff (quick suite; the full "
              "one: hdfunc verify)")
        start = time.perf_counter()
        status = verification_summary()
        print(f"({time.perf_counter() - start:.1f} s)\n")

    if not args.skip_study:
        print("== 3. A batched multi-seed study: 8 seeds x SGD, SGD-HD, Adam, Adam-HD in one vmap "
              "(more: hdfunc study --help)")
        start = time.perf_counter()
        study_summary(args.out)
        print(f"({time.perf_counter() - start:.1f} s)")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
