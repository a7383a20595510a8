"""One call per command: fit a table (with held-out runs), and the text the CLI prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from aimpre import files
from aimpre.scaling.fit import FORMS, FitResult, fit_chinchilla, fit_isoflop, fit_power
from aimpre.scaling.predict import holdout_report, predict
from aimpre.scaling.table import Table, TableError, drop_highest


def fit_table(
    table: Table,
    form: str,
    objective: str = "huber",
    bootstrap: int = 0,
    seed: int = 0,
    ci: float = 95.0,
    with_e: bool = True,
    budgets: list[float] | None = None,
    tol: float = 0.15,
    holdout: int = 0,
    drop: int = 0,
) -> FitResult:
    """Fits ``form`` to the table, optionally leaving out runs.

    Args:
        table: the runs.
        form: one of ``FORMS``.
        objective: for chinchilla/power: huber | likelihood | squares.
        bootstrap: resamples for the intervals.
        seed: the bootstrap seed.
        ci: interval coverage, percent.
        with_e: power form: with the irreducible term E.
        budgets: isoflop: the budgets (None: grouped automatically).
        tol: isoflop: the budget tolerance.
        holdout: leave out the runs of largest compute, then report the fit's predictions for them.
        drop: drop the runs of highest loss first (``table.drop_highest``).
    """
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {', '.join(FORMS)}")
    kept = drop_highest(table, drop)
    if not 0 <= holdout < len(kept):
        raise TableError(f"--holdout {holdout} must leave rows to fit (the table has {len(kept)})")
    order = np.argsort(kept.c, kind="stable")
    train = kept.subset(np.sort(order[: len(kept) - holdout]))
    held = kept.subset(np.sort(order[len(kept) - holdout :]))
    if form == "chinchilla":
        res = fit_chinchilla(train, objective, bootstrap=bootstrap, seed=seed, ci=ci)
    elif form == "power":
        res = fit_power(train, with_e, objective, bootstrap=bootstrap, seed=seed, ci=ci)
    else:
        res = fit_isoflop(train, budgets, tol, bootstrap=bootstrap, seed=seed, ci=ci)
    res.extra["dropped_highest"] = drop
    if holdout:
        res.extra["holdout"] = holdout_report(res, held)
    return res


def write_json(res: FitResult, out: str | Path) -> None:
    """The fit as JSON, written atomically."""
    files.write_text(out, json.dumps(res.to_json(), indent=2))


def read_json(path: str | Path) -> FitResult:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"fit file not found: {p}")
    return FitResult.from_json(json.loads(p.read_text()))


def _ci(lohi: list[float] | None) -> str:
    return f"[{lohi[0]:.4g}, {lohi[1]:.4g}]" if lohi else ""


def format_fit(res: FitResult) -> str:
    """A few lines: parameters with intervals, derived allocation, held-out predictions."""
    ci = res.extra.get("ci_percent", 95.0)
    lines = [f"{res.form} fit on {res.n_points} points: {res.method}; objective {res.objective:.6g}"]
    lines += [f"  note: {n}" for n in res.extra.get("notes", [])]
    failed = res.extra.get("bootstrap_failed", 0)
    boot = f"bootstrap {len(res.samples)}" + (f", {failed} resamples failed and were dropped" if failed else "")
    head = f"  {'param':8}{'value':>14}" + (f"   {ci:g}% CI ({boot})" if res.samples else "")
    lines.append(head)
    for k, v in res.params.items():
        lines.append(f"  {k:8}{v:>14.6g}   {_ci(res.ci.get(k))}")
    for k, v in res.derived.items():
        what = "N* ~ C^a" if k == "a" else "D* ~ C^b"
        lines.append(f"  {k:8}{v:>14.4f}   {_ci(res.derived_ci.get(k))}  ({what})")
    if res.form == "isoflop":
        for b in res.extra["budgets"]:
            found = f"N*={b['N_opt']:.4g} D*={b['D_opt']:.4g} L*={b['L_opt']:.4g}" if "N_opt" in b else "no minimum"
            if not b["used"]:
                found += f"  ({b['dropped']}: dropped, its {b['points']} points not counted)"
            lines.append(f"  budget C={b['C']:.3g}: {found}")
        for r in res.extra.get("off_budget", []):
            lines.append(f"  not used: {r['label']} (C={r['C']:.3g}): {r['reason']}")
    for h in res.extra.get("holdout", []):
        lines.append(
            f"  held out {h['label']}: loss {h['loss']:.4f}, predicted {h['predicted']:.4f} {_ci(h['ci'])} "
            f"({100 * h['rel_error']:+.2f}%)"
        )
    return "\n".join(lines)


def format_prediction(pred: dict[str, dict[str, Any]]) -> str:
    names = {"N_opt": "N*", "D_opt": "D*", "D_per_N": "D*/N*", "loss_opt": "loss at N*, D*", "loss": "loss"}
    return "\n".join(f"  {names.get(k, k):16}{v['value']:>14.6g}   {_ci(v['ci'])}" for k, v in pred.items())


__all__ = ["fit_table", "format_fit", "format_prediction", "predict", "read_json", "write_json"]
