"""Benchmark: the batched multi-start Chinchilla fit vs a plain loop of ``scipy.optimize.minimize`` calls.

Both minimise the same objective from the same 4500 starts, measured in the same process one after the other.
The loop is what one would write per start: a plain numpy objective with its analytic gradient (numpy beats
torch's per-call overhead at one start), or numerical gradients as Epoch AI's notebook does (``numeric``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
from scipy.optimize import minimize

from aimpre.scaling import law as lw
from aimpre.scaling.table import Table, require


def plain_objective(
    logn: np.ndarray, logd: np.ndarray, logl: np.ndarray, delta: float = 1e-3
) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """The Chinchilla Huber objective of one start in plain numpy (what a per-start loop would write), scaled
    like ``law.objective`` (by 1 / delta) so that both optimisers minimise the same function."""

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        a, b, e, alpha, beta = x
        t1, t2, t3 = np.exp(a - alpha * logn), np.exp(b - beta * logd), np.exp(e)
        tot = t1 + t2 + t3
        r = np.log(tot) - logl
        m = np.minimum(np.abs(r), delta)
        q = np.copysign(m, r) / tot / delta
        grad = [(q * t1).sum(), (q * t2).sum(), t3 * q.sum(), -(q * t1) @ logn, -(q * t2) @ logd]
        return float((m * (np.abs(r) - 0.5 * m)).sum() / delta), np.array(grad)

    return fun


def _loop(
    fun: Callable[[np.ndarray], tuple[float, np.ndarray]], starts: np.ndarray, numeric: bool
) -> tuple[float, np.ndarray]:
    def f_only(x: np.ndarray) -> float:
        return fun(x)[0]

    best, best_x = np.inf, starts[0]
    for s in starts:  # overflowing trial points are rejected by scipy's line search, as by ours
        r = minimize(f_only, s, method="L-BFGS-B") if numeric else minimize(fun, s, jac=True, method="L-BFGS-B")
        if np.isfinite(r.fun) and r.fun < best:
            best, best_x = float(r.fun), r.x
    return best, best_x


def bench_fit(table: Table, scipy_every: int = 1, numeric: bool = False) -> str:
    """Times both fits of the Huber objective (delta 1e-3); returns the table as text.

    Args:
        table: the runs (N and D are used).
        scipy_every: the loop runs every k-th start (its time then also shown scaled to all starts).
        numeric: the loop uses numerical gradients (Epoch AI's notebook) instead of the analytic one.
    """
    require(table, "chinchilla", min_points=8, min_n=3, min_d=3)
    law = lw.CHINCHILLA
    logx, logy = np.log(np.stack([table.n, table.d], axis=1)), np.log(table.loss)
    starts = lw.grid_starts(law, lw.CHINCHILLA_GRID)
    t0 = time.perf_counter()
    ours = lw.fit_multistart(law, logx, logy, starts, "huber")
    t_ours = time.perf_counter() - t0
    sub = starts[::scipy_every]
    t0 = time.perf_counter()
    with np.errstate(all="ignore"):
        best, best_x = _loop(plain_objective(logx[:, 0], logx[:, 1], logy), sub, numeric)
    t_loop = time.perf_counter() - t0
    best *= 1e-3  # reported unscaled, as the batched fit's
    full = t_loop * len(starts) / len(sub)

    def fmt(p: dict[str, float]) -> str:
        return " ".join(f"{k}={p[k]:.5g}" for k in ("E", "A", "B", "alpha", "beta"))

    grad = "numerical" if numeric else "analytic"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [
        f"Chinchilla-form fit (Huber, delta 1e-3), {len(table)} points, {len(starts)}-start grid; "
        f"{os.cpu_count()} cores, load average {load:.1f} at the end",
        f"{'method':46}{'starts':>7}{'seconds':>10}{'ms/start':>10}{'objective':>14}  parameters",
        f"{'batched L-BFGS, all starts at once (aimpre)':46}{len(starts):>7}{t_ours:>10.2f}"
        f"{1000 * t_ours / len(starts):>10.2f}{ours.value:>14.8g}  {fmt(lw.chinchilla_params(ours.theta))}",
        f"{f'scipy L-BFGS-B loop, {grad} gradient':46}{len(sub):>7}{t_loop:>10.2f}"
        f"{1000 * t_loop / len(sub):>10.2f}{best:>14.8g}  {fmt(lw.chinchilla_params(best_x))}",
    ]
    if len(sub) < len(starts):
        rows.append(f"{'  the loop scaled to all starts (estimate)':46}{len(starts):>7}{full:>10.1f}")
    rows.append(f"speed-up: {full / t_ours:.1f}x")
    return "\n".join(rows)
