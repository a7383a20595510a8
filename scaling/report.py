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
    bins: int | None = None,
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
        bins: power: fit the best run of each of this many log10-C bins instead of the frontier (``fit.bin_best``).
    """
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {', '.join(FORMS)}")
    if bins is not None and form != "power":
        raise TableError(f"--bins applies to --form power only, not --form {form}")
    kept = drop_highest(table, drop)
    if not 0 <= holdout < len(kept):
        raise TableError(f"--holdout {holdout} must leave rows to fit (the table has {len(kept)})")
    order = np.argsort(kept.c, kind="stable")
    train = kept.subset(np.sort(order[: len(kept) - holdout]))
    held = kept.subset(np.sort(order[len(kept) - holdout :]))
    if form == "chinchilla":
        res = fit_chinchilla(train, objective, bootstrap=bootstrap, seed=seed, ci=ci)
    elif form == "power":
        res = fit_power(train, with_e, objective, bootstrap=bootstrap, seed=seed, ci=ci, bins=bins)
    else:
        res = fit_isoflop(train, budgets, tol, bootstrap=bootstrap, seed=seed, ci=ci)
    res.extra["dropped_highest"] = drop
    if holdout:
        res.extra["holdout"] = holdout_report(res, held)
    return res


def fit_groups(table: Table, form: str, **kwargs: Any) -> dict[str, FitResult]:
    """One ``fit_table`` per value of the table's group column (e.g. one per objective), in table order; an
    ungrouped table gives {"": fit}. A group that cannot be fitted is named in the error."""
    column = table.columns.group
    out = {}
    for name, part in table.by_group().items():
        try:
            out[name] = fit_table(part, form, **kwargs)
        except TableError as e:
            raise TableError(f"{column} {name!r} ({len(part)} rows): {e}" if column else str(e)) from None
        if column:
            out[name].extra["group"] = {column: name}
    return out


def write_json(res: FitResult | dict[str, FitResult], out: str | Path) -> None:
    """The fit as JSON, written atomically; per-group fits (``fit_groups``) as {"group_column", "fits"}."""
    if isinstance(res, dict):
        if list(res) == [""]:
            res = res[""]
        else:
            column = next(iter(res.values())).columns.get("group")
            doc = {"group_column": column, "fits": {k: v.to_json() for k, v in res.items()}}
            files.write_text(out, json.dumps(doc, indent=2))
            return
    files.write_text(out, json.dumps(res.to_json(), indent=2))


def read_fits(path: str | Path) -> dict[str, FitResult]:
    """Every fit in a fit JSON: {group: fit} ({"": fit} for a file of one fit)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"fit file not found: {p}")
    doc = files.read_json_object(p, "fit file")
    if "fits" in doc:
        if not isinstance(doc["fits"], dict) or not doc["fits"]:
            raise ValueError(f"{p}: 'fits' holds no fits")
        return {k: FitResult.from_json(v) for k, v in doc["fits"].items()}
    return {"": FitResult.from_json(doc)}


def read_json(path: str | Path, group: str | None = None) -> FitResult:
    """The one fit of a fit JSON, or its fit for ``group`` when it holds one per group."""
    fits = read_fits(path)
    if group is None and len(fits) == 1:
        return next(iter(fits.values()))
    if group not in fits:
        column = next(iter(fits.values())).columns.get("group") or "group"
        given = "" if group is None else f" ({group!r} is not one)"
        raise ValueError(f"{path} holds one fit per {column} ({', '.join(fits)}); name one with --group{given}")
    return fits[group]


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
    if res.extra.get("rule") == "bins" and "A" in res.params and "E" not in res.params:  # Cherti et al.'s names
        y, beta, alpha = "error" if res.columns.get("error") else "loss", res.params["A"], -res.params["alpha"]
        lines.append(f"  i.e. {y} = beta * C^alpha with beta = {beta:.6g}, alpha = {alpha:.6g} (Cherti et al. 2023)")
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
    for b in res.extra.get("per_bin", []):
        lo, hi = b["log10_C"]
        best = f"best {b['best']} (C={b['C']:.3g}, {b['y']:.4g})" if b["best"] is not None else "no runs: skipped"
        lines.append(f"  bin log10 C in [{lo:.2f}, {hi:.2f}]: {b['runs']} runs, {best}")
    for h in res.extra.get("holdout", []):
        lines.append(
            f"  held out {h['label']}: loss {h['loss']:.4f}, predicted {h['predicted']:.4f} {_ci(h['ci'])} "
            f"({100 * h['rel_error']:+.2f}%)"
        )
    return "\n".join(lines)


def format_fits(fits: dict[str, FitResult]) -> str:
    """``format_fit`` of each group's fit under a heading naming the group."""
    if list(fits) == [""]:
        return format_fit(fits[""])
    column = next(iter(fits.values())).columns.get("group")
    return "\n".join(f"{column} {name}:\n" + format_fit(f) for name, f in fits.items())


def format_prediction(pred: dict[str, dict[str, Any]]) -> str:
    names = {"N_opt": "N*", "D_opt": "D*", "D_per_N": "D*/N*", "loss_opt": "loss at N*, D*", "loss": "loss"}
    return "\n".join(f"  {names.get(k, k):16}{v['value']:>14.6g}   {_ci(v['ci'])}" for k, v in pred.items())


__all__ = [
    "fit_groups", "fit_table", "format_fit", "format_fits", "format_prediction", "predict", "read_fits", "read_json",
    "write_json",
]  # fmt: skip
