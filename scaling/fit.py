"""Fitting scaling laws to a results table: the Chinchilla form, power laws in compute, iso-FLOP parabolas.

- ``chinchilla``: L(N, D) = E + A/N^alpha + B/D^beta, fitted as Hoffmann et al. 2022 (App. D.2): Huber
  (delta 1e-3) on log-loss residuals of the log-sum-exp form, L-BFGS from their 4500-point grid, best kept.
  ``objective="likelihood"`` is Epoch AI's Huber-likelihood refit (arXiv:2404.10102). On the Chinchilla data
  both land on Epoch's published values (``tests/test_scaling_chinchilla.py``).
- ``power``: L(C) = E + A C^-alpha (or A C^-alpha, ``with_e=False``) on the compute frontier: the runs that
  reach a lower loss than every run of smaller compute. With ``bins`` K the points are instead the best run of
  each of K equal-width bins of log10 C, as Cherti et al. 2023 (open_clip scaling laws) fit downstream error
  E = beta C^alpha; without E that fit is their ordinary least-squares line in log10-log10 (``bin_best``).
- ``isoflop``: Hoffmann et al.'s Approach 2: per compute budget a parabola of loss in log N, its minimum
  N*(C) (used only where it lies inside the budget's sampled sizes); then N* = kN C^a and D* = kD C^b by least
  squares in log-log.
Confidence intervals come from a seeded nonparametric bootstrap: rows resampled with replacement (within each
budget for iso-FLOP), each resample refitted from the full-data optimum as Epoch do (for iso-FLOP: the
parabolas refitted), percentile intervals.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from aimpre.scaling import law as lw
from aimpre.scaling.table import Table, TableError, require

FORMS = ("chinchilla", "power", "isoflop")


@dataclass
class FitResult:
    """What ``aimpre scaling fit --json`` writes: the form's own parameters, intervals and provenance."""

    form: str
    params: dict[str, float]
    ci: dict[str, list[float]]
    n_points: int
    objective: float
    method: str
    columns: dict[str, str | None]
    flops_per_param: float
    se: dict[str, float] = field(default_factory=dict)
    derived: dict[str, float] = field(default_factory=dict)  # e.g. the allocation exponents of a Chinchilla fit
    derived_ci: dict[str, list[float]] = field(default_factory=dict)
    samples: list[dict[str, float]] = field(default_factory=list)  # bootstrap estimates of ``params``
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FitResult:
        missing = [k for k in ("form", "params", "ci", "n_points", "objective") if k not in d]
        if missing or d["form"] not in FORMS:
            raise ValueError(f"not an aimpre scaling fit: missing {missing or 'a known form'}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def percentile_interval(values: np.ndarray, ci: float) -> list[float]:
    """The central ``ci`` percent of ``values``: [low, high]."""
    lo = (100.0 - ci) / 2
    return [float(np.percentile(values, lo)), float(np.percentile(values, 100 - lo))]


def _summarise(res: FitResult, samples: list[dict[str, float]], ci: float) -> None:
    """Fills ci / se from the bootstrap estimates; a refit that diverged (non-finite) is dropped and counted."""
    res.samples = [s for s in samples if all(np.isfinite(v) for v in s.values())]
    res.extra["bootstrap_failed"] = res.extra.get("bootstrap_failed", 0) + len(samples) - len(res.samples)
    samples = res.samples
    if not samples:
        return
    for name in res.params:
        v = np.array([s[name] for s in samples])
        res.ci[name] = percentile_interval(v, ci)
        res.se[name] = float(v.std(ddof=1)) if len(v) > 1 else 0.0


def bootstrap_weights(n: int, k: int, seed: int) -> np.ndarray:
    """[k, n] counts of each row in k resamples of n rows with replacement."""
    rng = np.random.default_rng(seed)
    w = np.zeros((k, n))
    np.add.at(w, (np.repeat(np.arange(k), n), rng.integers(0, n, size=k * n)), 1.0)
    return w


def fit_chinchilla(
    table: Table,
    objective: str = "huber",
    delta: float = 1e-3,
    bootstrap: int = 0,
    seed: int = 0,
    ci: float = 95.0,
    starts: np.ndarray | None = None,
) -> FitResult:
    """L(N, D) = E + A/N^alpha + B/D^beta (see the module docstring).

    Args:
        table: the runs.
        objective: "huber" (Hoffmann et al.), "likelihood" (Epoch AI) or "squares".
        delta: the Huber threshold.
        bootstrap: resamples for the intervals (0: none).
        seed: the bootstrap's seed.
        ci: interval coverage in percent.
        starts: [S, 5] initial (a, b, e, alpha, beta); default Hoffmann et al.'s 4500-point grid.
    """
    require(table, "chinchilla", min_points=8, min_n=3, min_d=3)
    law = lw.CHINCHILLA
    logx, logy = np.log(np.stack([table.n, table.d], axis=1)), np.log(table.loss)
    x0 = lw.grid_starts(law, lw.CHINCHILLA_GRID) if starts is None else np.asarray(starts, dtype=np.float64)
    t0 = time.perf_counter()
    best = lw.fit_multistart(law, logx, logy, x0, objective, delta)
    seconds = time.perf_counter() - t0
    params = lw.chinchilla_params(best.theta)
    res = FitResult(
        form="chinchilla", params=params, ci={}, n_points=len(table), objective=best.value,
        method=f"{objective} (delta {delta:g}) on log-loss residuals, L-BFGS from {best.starts} starts, best kept",
        columns=asdict(table.columns), flops_per_param=table.flops_per_param,
        extra={"starts": best.starts, "converged_starts": best.converged, "fit_seconds": round(seconds, 3),
               "bootstrap": bootstrap, "seed": seed, "ci_percent": ci, "notes": table.notes},
    )  # fmt: skip
    res.derived = _allocation_exponents(params)
    if bootstrap:
        w = bootstrap_weights(len(table), bootstrap, seed)
        thetas = lw.refit_weighted(law, logx, logy, best.theta, w, objective, delta)
        _summarise(res, [lw.chinchilla_params(t) for t in thetas], ci)
        for key in res.derived if res.samples else ():
            draws = np.array([_allocation_exponents(s)[key] for s in res.samples])
            res.derived_ci[key] = percentile_interval(draws, ci)
    return res


def _allocation_exponents(p: dict[str, float]) -> dict[str, float]:
    """N* ~ C^a and D* ~ C^b with a = beta/(alpha+beta), b = alpha/(alpha+beta) (Hoffmann et al., Eq. 4)."""
    s = p["alpha"] + p["beta"]
    return {"a": p["beta"] / s, "b": p["alpha"] / s}


def frontier(table: Table) -> np.ndarray:
    """Indices of the compute frontier, by increasing C: runs whose loss beats every run of smaller compute."""
    order = np.argsort(table.c, kind="stable")
    keep, best = [], math.inf
    for i in order:
        if table.loss[i] < best:
            keep.append(i)
            best = table.loss[i]
    return np.array(keep, dtype=np.int64)


def bin_best(table: Table, bins: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Cherti et al. 2023's selection: the best (lowest loss or error) run of each of ``bins`` equal-width bins
    of log10 C; its indices by increasing C, and one entry per bin (empty bins have ``best`` None).

    Checked against ``binned_line_fit`` in LAION-AI/scaling-laws-openclip's ``figures.ipynb`` (the paper's
    figures): np.histogram bins over [min, max + 0.1] of log10 GMACs, nbins=5, the minimum log10 error per bin,
    a least-squares line through (bin centre, minimum). Two departures: the bins span [min, max] exactly (the
    last bin closed, which is what their + 0.1 achieves), and each bin's point sits at its best run's own
    compute rather than at the bin's centre, which would shift every point by up to half a bin and bias the
    intercept (the best run of a bin is usually its largest). An empty bin, which stops their code, is skipped.
    """
    if bins < 2:
        raise TableError(f"--bins must be at least 2, got {bins}")
    x = np.log10(table.c)
    edges = np.linspace(x.min(), x.max(), bins + 1)
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)  # the last bin includes the max
    keep, entries = [], []
    for b in range(bins):
        members = np.flatnonzero(which == b)
        entry: dict[str, Any] = {"bin": b, "log10_C": [float(edges[b]), float(edges[b + 1])], "runs": len(members),
                                 "best": None}  # fmt: skip
        if len(members):
            i = int(members[np.argmin(table.loss[members])])
            keep.append(i)
            entry.update(best=table.labels[i], C=float(table.c[i]), y=float(table.loss[i]))
        entries.append(entry)
    return np.array(keep, dtype=np.int64), entries


def _log_line(logc: np.ndarray, logy: np.ndarray, w: np.ndarray | None = None) -> dict[str, float]:
    """The least-squares line log10 y = log10 A - alpha log10 C, as {"A", "alpha"} (non-finite when the
    weighted points have fewer than 2 distinct C, e.g. a bootstrap resample of one point)."""
    if w is not None and len(np.unique(logc[w > 0])) < 2:
        return {"A": math.nan, "alpha": math.nan}
    slope, intercept = np.polyfit(logc, logy, 1, w=None if w is None else np.sqrt(w))  # sqrt: polyfit squares w
    return {"A": float(10.0**intercept), "alpha": float(-slope)}


def fit_power(
    table: Table,
    with_e: bool = True,
    objective: str = "huber",
    delta: float = 1e-3,
    bootstrap: int = 0,
    seed: int = 0,
    ci: float = 95.0,
    bins: int | None = None,
) -> FitResult:
    """L(C) = E + A C^-alpha (or A C^-alpha) on the compute frontier (arguments as ``fit_chinchilla``).

    Args:
        bins: None: the frontier. K: the best run of each of K equal-width bins of log10 C (``bin_best``);
            without E, the line is then fitted by ordinary least squares in log10-log10 (Cherti et al. 2023)
            and ``objective``/``delta`` do not apply.
    """
    law = lw.POWER if with_e else lw.POWER_NO_E
    need = len(law.names) + 1
    form = f"--form power{'' if with_e else ' --no-e'}"
    if bins is None:
        idx, per_bin = frontier(table), None
        if len(idx) < need:
            raise TableError(
                f"{form} needs at least {need} points on the compute frontier "
                f"(runs beating every run of smaller compute); the table has {len(idx)} of {len(table)} rows"
            )
    else:
        idx, per_bin = bin_best(table, bins)
        if len(idx) < need:
            raise TableError(
                f"--bins {bins}: only {len(idx)} of the {bins} equal-width bins of log10 C hold runs; {form} needs "
                f"{need} bins with runs (lower --bins, or add runs across the compute range)"
            )
    if per_bin is not None and not with_e:
        return _fit_binned_line(table, idx, per_bin, bins or 0, bootstrap, seed, ci)
    logx, logy = np.log(table.c[idx])[:, None], np.log(table.loss[idx])
    grid = dict(lw.POWER_GRID) if with_e else {"a": lw.POWER_GRID["a"], "alpha": lw.POWER_GRID["alpha"]}
    best = lw.fit_multistart(law, logx, logy, lw.grid_starts(law, grid), objective, delta)
    res = FitResult(
        form="power", params=lw.power_params(best.theta, with_e), ci={}, n_points=len(idx), objective=best.value,
        method=f"{objective} (delta {delta:g}) on log-loss residuals of the frontier, L-BFGS from {best.starts} starts",
        columns=asdict(table.columns), flops_per_param=table.flops_per_param,
        extra={"with_e": with_e, "frontier": [table.labels[i] for i in idx], "bootstrap": bootstrap, "seed": seed,
               "ci_percent": ci, "notes": table.notes},
    )  # fmt: skip
    if per_bin is not None:  # the points are the bins' best runs, not the frontier
        res.method = res.method.replace("of the frontier", f"of the best run of each of {bins} log10-C bins")
        res.extra.update(frontier=[], rule="bins", bins=bins, per_bin=per_bin, points=[table.labels[i] for i in idx])
    if bootstrap:
        thetas = lw.refit_weighted(law, logx, logy, best.theta, bootstrap_weights(len(idx), bootstrap, seed),
                                   objective, delta)  # fmt: skip
        _summarise(res, [lw.power_params(t, with_e) for t in thetas], ci)
    return res


def _fit_binned_line(
    table: Table, idx: np.ndarray, per_bin: list[dict], bins: int, bootstrap: int, seed: int, ci: float
) -> FitResult:
    """Cherti et al.'s fit: y = A C^-alpha by least squares on (log10 C, log10 y) of the bins' best runs."""
    logc, logy = np.log10(table.c[idx]), np.log10(table.loss[idx])
    params = _log_line(logc, logy)
    resid = logy - (np.log10(params["A"]) - params["alpha"] * logc)
    res = FitResult(
        form="power", params=params, ci={}, n_points=len(idx), objective=float(0.5 * (resid**2).sum()),
        method=f"least-squares line in log10-log10 through the best run of each of {bins} equal-width log10-C bins "
               "(Cherti et al. 2023)",
        columns=asdict(table.columns), flops_per_param=table.flops_per_param,
        extra={"with_e": False, "frontier": [], "rule": "bins", "bins": bins, "per_bin": per_bin,
               "points": [table.labels[i] for i in idx], "bootstrap": bootstrap, "seed": seed, "ci_percent": ci,
               "notes": table.notes},
    )  # fmt: skip
    if bootstrap:
        w = bootstrap_weights(len(idx), bootstrap, seed)
        _summarise(res, [_log_line(logc, logy, row) for row in w], ci)
    return res


def group_budgets(c: np.ndarray, budgets: list[float] | None = None, tol: float = 0.15) -> np.ndarray:
    """Budget index of every row (-1: on no budget).

    Args:
        c: [n] training FLOPs.
        budgets: the iso-FLOP budgets; a row belongs to the nearest within a factor 1 + tol. None: rows are
            clustered by increasing C, each budget holding the rows within a factor 1 + tol of its smallest C
            (so a budget spans at most 1 + tol: close rows cannot chain one budget across many).
        tol: the relative tolerance.
    """
    out = np.full(len(c), -1, dtype=np.int64)
    if budgets:
        b = np.log(np.asarray(budgets, dtype=np.float64))
        dist = np.abs(np.log(c)[:, None] - b[None])  # [n, budgets]
        near = dist.argmin(axis=1)
        ok = dist[np.arange(len(c)), near] <= math.log1p(tol)
        out[ok] = near[ok]
        return out
    group, first = -1, -math.inf
    for i in np.argsort(c, kind="stable"):
        if c[i] > first * (1 + tol):  # beyond the budget's first row: start the next budget here
            group, first = group + 1, c[i]
        out[i] = group
    return out


def parabola(logn: np.ndarray, loss: np.ndarray) -> np.ndarray | None:
    """Least-squares (q2, q1, q0) of loss = q2 x^2 + q1 x + q0 in x = log N; None if < 3 sizes or not convex."""
    if len(np.unique(np.round(logn, 9))) < 3:
        return None
    q = np.polyfit(logn, loss, 2)
    return q if q[0] > 0 else None


def _isoflop_fit(table: Table, rows: list[np.ndarray]) -> tuple[dict[str, float], list[dict], float]:
    """The power laws through the per-budget minima computed on ``rows`` (an index array per budget);
    also every budget's entry (``used`` False with a ``dropped`` reason for those left out) and the used
    parabolas' summed squared residuals."""
    budgets, sse = [], 0.0
    for g, r in enumerate(rows):
        logn = np.log(table.n[r])
        entry: dict[str, Any] = {"budget": g, "C": float(np.exp(np.log(table.c[r]).mean())), "points": len(r)}
        q = parabola(logn, table.loss[r])
        if q is None:  # no minimum to read: the loss does not turn up at both ends of the sizes
            budgets.append({**entry, "inside": False, "used": False, "dropped": "concave, no minimum in N"})
            continue
        x = -q[1] / (2 * q[0])
        d1, d0 = np.polyfit(logn, np.log(table.d[r]), 1)  # log D along the budget (linear when C = k N D)
        n_opt = math.exp(x)
        inside = bool(table.n[r].min() <= n_opt <= table.n[r].max())  # False: an extrapolated minimum
        budgets.append({
            **entry, "N_opt": n_opt, "D_opt": math.exp(d0 + d1 * x), "L_opt": float(np.polyval(q, x)),
            "inside": inside, "used": inside, "dropped": None if inside else "minimum outside the sampled sizes",
        })  # fmt: skip
        if inside:
            sse += float(((np.polyval(q, logn) - table.loss[r]) ** 2).sum())
    # a minimum outside the sampled sizes is an extrapolation of the parabola: reported, not fitted
    used = [b for b in budgets if b["used"]]
    if len(used) < 2:
        convex = sum(1 for b in budgets if "N_opt" in b)
        raise TableError(
            f"--form isoflop needs at least 2 budgets whose parabola has its minimum inside the sampled sizes; "
            f"found {len(used)} ({convex} convex of {len(rows)} budgets with 3+ sizes)"
        )
    logc = np.log([b["C"] for b in used])
    a, log_kn = np.polyfit(logc, np.log([b["N_opt"] for b in used]), 1)
    b, log_kd = np.polyfit(logc, np.log([b["D_opt"] for b in used]), 1)
    return {"a": float(a), "kN": math.exp(log_kn), "b": float(b), "kD": math.exp(log_kd)}, budgets, sse


def off_budget_rows(table: Table, budgets: list[float] | None, tol: float) -> list[dict[str, Any]]:
    """The rows on no budget with 3+ sizes (``budget_rows``), each with its label, C and why."""
    groups = group_budgets(table.c, budgets, tol)
    out = []
    for i, g in enumerate(groups):
        members = np.flatnonzero(groups == g)
        if g < 0:
            why = f"C is not within a factor {1 + tol:g} of any of --budgets"
        elif len(np.unique(table.n[members])) < 3:
            why = f"its budget (C~{np.exp(np.log(table.c[members]).mean()):.3g}) has fewer than 3 model sizes"
        else:
            continue
        out.append({"label": table.labels[i], "C": float(table.c[i]), "reason": why})
    return out


def budget_rows(table: Table, budgets: list[float] | None, tol: float) -> list[np.ndarray]:
    """Row indices of each compute budget (``group_budgets``) that has 3 or more model sizes."""
    groups = group_budgets(table.c, budgets, tol)
    rows = [np.flatnonzero(groups == g) for g in range(groups.max() + 1)]
    return [r for r in rows if len(np.unique(table.n[r])) >= 3]


def fit_isoflop(
    table: Table,
    budgets: list[float] | None = None,
    tol: float = 0.15,
    bootstrap: int = 0,
    seed: int = 0,
    ci: float = 95.0,
) -> FitResult:
    """Hoffmann et al.'s Approach 2 (see the module docstring; ``budgets``/``tol`` as ``group_budgets``)."""
    require(table, "isoflop", min_points=6, min_n=3)
    rows = budget_rows(table, budgets, tol)
    if len(rows) < 2:
        raise TableError(
            "--form isoflop needs at least 2 compute budgets with 3 or more model sizes each; found "
            f"{len(rows)} (budgets are grouped within a factor {1 + tol:g}; pass --budgets to name them)"
        )
    params, per_budget, sse = _isoflop_fit(table, rows)
    used = sum(b["points"] for b in per_budget if b["used"])  # rows of dropped budgets are not counted
    res = FitResult(
        form="isoflop", params=params, ci={}, n_points=used, objective=sse,
        method="per-budget least-squares parabola of loss in log N; log-log least squares of the minima",
        columns=asdict(table.columns), flops_per_param=table.flops_per_param,
        extra={"budgets": per_budget, "dropped_rows": len(table) - used, "bootstrap": bootstrap, "seed": seed,
               "ci_percent": ci, "notes": table.notes, "off_budget": off_budget_rows(table, budgets, tol)},
    )  # fmt: skip
    if bootstrap:
        rng = np.random.default_rng(seed)
        samples, failed = [], 0
        for _ in range(bootstrap):
            resampled = [r[rng.integers(0, len(r), len(r))] for r in rows]
            try:
                samples.append(_isoflop_fit(table, resampled)[0])
            except (TableError, np.linalg.LinAlgError):
                failed += 1  # too few distinct sizes or no convex parabola in this resample
        res.extra["bootstrap_failed"] = failed
        _summarise(res, samples, ci)
    return res
