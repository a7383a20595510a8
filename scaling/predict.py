"""Predictions from a fit: compute-optimal allocation N*(C), D*(C), samples per parameter, loss at a budget.

Allocation assumes C = k N D with k the fit's ``flops_per_param`` (6 for language models counting tokens; for
an AIMv2 table the median of C / (N D) over its runs, see ``aimpre.scaling.table``). Every prediction comes
with a percentile interval when the fit has bootstrap samples: the prediction is recomputed for each sample.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from aimpre.scaling import law as lw
from aimpre.scaling.fit import FitResult, percentile_interval
from aimpre.scaling.table import Table


def _point(p: dict[str, float], fit: FitResult, flops: float | None, n: float | None, d: float | None) -> dict:
    out: dict[str, float] = {}
    k = fit.flops_per_param
    if fit.form == "chinchilla":
        if flops is not None:
            n_opt, d_opt = (float(v) for v in lw.compute_optimal(p, flops, k))
            out |= {"N_opt": n_opt, "D_opt": d_opt, "D_per_N": d_opt / n_opt,
                    "loss_opt": float(lw.chinchilla_loss(p, n_opt, d_opt))}  # fmt: skip
        if n is not None and d is not None:
            out["loss"] = float(lw.chinchilla_loss(p, n, d))
    elif fit.form == "power":
        if flops is not None:
            out["loss_opt"] = float(lw.power_loss(p, flops))
    elif flops is not None:  # isoflop
        n_opt, d_opt = p["kN"] * flops ** p["a"], p["kD"] * flops ** p["b"]
        out |= {"N_opt": n_opt, "D_opt": d_opt, "D_per_N": d_opt / n_opt}
    return out


def predict(
    fit: FitResult, flops: float | None = None, n: float | None = None, d: float | None = None
) -> dict[str, dict[str, Any]]:
    """What the fit says at a budget and/or at a given (N, D).

    Args:
        fit: a fit result.
        flops: a compute budget C: gives N*(C), D*(C), D*/N* and the loss at the optimum, as the form allows.
        n: parameters, with ``d``: gives the predicted loss of that run (Chinchilla form).
        d: samples (or tokens).

    Returns:
        {quantity: {"value": v, "ci": [lo, hi] or None}}.
    """
    if flops is None and (n is None or d is None):
        raise ValueError("predict needs a compute budget (--flops) or both N and D (--n-params, --d-samples)")
    for name, v in (("flops", flops), ("n", n), ("d", d)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive number, got {v}")
    point = _point(fit.params, fit, flops, n, d)
    if not point:
        raise ValueError(f"a {fit.form} fit cannot predict from {'N and D' if flops is None else 'a budget'} alone")
    draws = [_point(s, fit, flops, n, d) for s in fit.samples]
    ci_percent = fit.extra.get("ci_percent", 95.0)
    out = {}
    for key, value in point.items():
        vals = np.array([s[key] for s in draws])
        out[key] = {"value": value, "ci": percentile_interval(vals, ci_percent) if len(vals) else None}
    return out


def holdout_report(fit: FitResult, held: Table) -> list[dict[str, Any]]:
    """Predicted vs measured loss of held-out runs (Chinchilla form: L(N, D); power form: L(C))."""
    if fit.form == "isoflop":
        raise ValueError("an iso-FLOP fit predicts allocations, not losses: hold out runs with --form chinchilla")
    rows = []
    for i in range(len(held)):
        if fit.form == "chinchilla":
            p = predict(fit, n=float(held.n[i]), d=float(held.d[i]))["loss"]
        else:
            p = predict(fit, flops=float(held.c[i]))["loss_opt"]
        rows.append({
            "label": held.labels[i], "N": float(held.n[i]), "D": float(held.d[i]), "C": float(held.c[i]),
            "loss": float(held.loss[i]), "predicted": p["value"], "ci": p["ci"],
            "rel_error": (p["value"] - float(held.loss[i])) / float(held.loss[i]),
        })  # fmt: skip
    return rows
