"""L-BFGS over many independent problems at once (numpy, float64).

A scaling-law fit is started from a grid of thousands of initial points (Hoffmann et al. 2022, App. D.2: 4500)
and the best optimum kept; bootstrapping refits hundreds of resampled data sets. Each is a small problem (5-6
parameters), so a Python loop over ``scipy.optimize.minimize`` spends its time in per-call overhead. Here every
problem is one row: the two-loop recursion, the line search and the convergence tests are array operations over
all rows, and rows drop out of the batch as they converge.

The stopping rules are scipy L-BFGS-B's (``ftol``: relative decrease of f, ``gtol``: largest gradient entry,
``maxiter``, ``m`` = 10 correction pairs), so a batched fit and a scipy loop are comparable. The line search
starts from the unit step, backtracks until Armijo's condition holds, and lengthens a full step while the
weak Wolfe curvature condition fails and f keeps falling (a cheap stand-in for scipy's More-Thuente search);
a curvature pair with ``s.y <= 0`` is dropped, which keeps the inverse Hessian estimate positive definite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# f, g = fun(x, rows): x [R, P] the current points of the problems numbered ``rows`` [R]; f [R], g [R, P]
Objective = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class Result:
    x: np.ndarray  # [S, P] the final points
    fun: np.ndarray  # [S] objective values there
    iterations: np.ndarray  # [S]
    converged: np.ndarray  # [S] bool: a stopping test held before maxiter (or the line search found no decrease)


def minimize(
    fun: Objective,
    x0: np.ndarray,
    maxiter: int = 15000,
    m: int = 10,
    ftol: float = 2.2e-9,
    gtol: float = 1e-5,
    c1: float = 1e-4,
    c2: float = 0.9,
    max_backtracks: int = 40,
    max_expand: int = 10,
) -> Result:
    """Minimises S independent problems from S starting points.

    Args:
        fun: the objective and its gradient for a subset of the problems (see ``Objective``).
        x0: [S, P] starting points.
        maxiter: iterations per problem.
        m: correction pairs kept (scipy's ``maxcor``).
        ftol: stop when (f_old - f_new) / max(|f_old|, |f_new|, 1) <= ftol.
        gtol: stop when max |g| <= gtol.
        c1: Armijo sufficient-decrease constant.
        c2: curvature constant: a full step whose slope is still below c2 times the initial one is lengthened.
        max_backtracks: halvings of the step before a problem is declared stuck.
        max_expand: step lengthenings (x4 each) per iteration.
    """
    with np.errstate(all="ignore"):  # trial points may overflow: a non-finite f fails the line search
        return _minimize(
            fun, np.array(x0, dtype=np.float64), maxiter, m, ftol, gtol, c1, c2, max_backtracks, max_expand
        )


def _minimize(
    fun: Objective,
    x: np.ndarray,
    maxiter: int,
    m: int,
    ftol: float,
    gtol: float,
    c1: float,
    c2: float,
    max_backtracks: int,
    max_expand: int,
) -> Result:
    S, P = x.shape
    f, g = fun(x, np.arange(S))
    s_hist = np.zeros((m, S, P))
    y_hist = np.zeros((m, S, P))
    rho = np.zeros((m, S))  # 0 marks an empty or rejected pair: it then drops out of the recursion
    gamma = np.ones(S)  # initial inverse Hessian scale, s.y / y.y of the newest accepted pair
    iters = np.zeros(S, dtype=np.int64)
    done = np.zeros(S, dtype=bool)
    done |= np.abs(g).max(axis=1) <= gtol
    first_step = np.ones(S, dtype=bool)
    for it in range(maxiter):
        a = np.flatnonzero(~done)  # active problems
        if a.size == 0:
            break
        slot = it % m
        order = [(slot - 1 - j) % m for j in range(m)]  # newest pair first
        # two-loop recursion: d = -H g on the active rows
        q = g[a].copy()
        alphas = []
        for j in order:
            al = rho[j, a] * np.einsum("rp,rp->r", s_hist[j, a], q)
            q -= al[:, None] * y_hist[j, a]
            alphas.append(al)
        r = gamma[a, None] * q
        for j, al in zip(reversed(order), reversed(alphas), strict=True):
            be = rho[j, a] * np.einsum("rp,rp->r", y_hist[j, a], r)
            r += (al - be)[:, None] * s_hist[j, a]
        d = -r
        # the first step of a problem (no curvature yet) is scaled to unit length, as scipy does
        fs = first_step[a]
        d[fs] /= np.maximum(np.linalg.norm(d[fs], axis=1, keepdims=True), 1.0)
        slope = np.einsum("rp,rp->r", g[a], d)
        bad = slope >= 0  # not a descent direction (round-off): restart from steepest descent
        if bad.any():
            d[bad] = -g[a][bad]
            slope[bad] = -np.einsum("rp,rp->r", g[a][bad], g[a][bad])
        # backtracking line search, vectorised: rows that satisfy Armijo leave the loop
        t = np.ones(a.size)
        x_new = np.empty((a.size, P))
        f_new = np.empty(a.size)
        g_new = np.empty((a.size, P))
        pending = np.arange(a.size)
        for _ in range(max_backtracks):
            xt = x[a[pending]] + t[pending, None] * d[pending]
            ft, gt = fun(xt, a[pending])
            ok = np.isfinite(ft) & (ft <= f[a[pending]] + c1 * t[pending] * slope[pending])
            idx = pending[ok]
            x_new[idx], f_new[idx], g_new[idx] = xt[ok], ft[ok], gt[ok]
            pending = pending[~ok]
            if pending.size == 0:
                break
            t[pending] *= 0.5
        # expansion: where the full step was accepted but the slope there is still steep (the weak Wolfe
        # curvature condition fails), try longer steps while they keep decreasing f. Without it, a start on a
        # plateau of a poorly scaled direction crawls for thousands of iterations.
        grow = np.flatnonzero((t == 1.0) & np.isfinite(f_new))
        grow = grow[np.einsum("rp,rp->r", g_new[grow], d[grow]) < c2 * slope[grow]]
        for _ in range(max_expand):
            if grow.size == 0:
                break
            tt = t[grow] * 4.0
            xt = x[a[grow]] + tt[:, None] * d[grow]
            ft, gt = fun(xt, a[grow])
            ok = np.isfinite(ft) & (ft < f_new[grow]) & (ft <= f[a[grow]] + c1 * tt * slope[grow])
            idx = grow[ok]
            t[idx], x_new[idx], f_new[idx], g_new[idx] = tt[ok], xt[ok], ft[ok], gt[ok]
            grow = idx[np.einsum("rp,rp->r", gt[ok], d[idx]) < c2 * slope[idx]]
        stuck = np.zeros(a.size, dtype=bool)
        stuck[pending] = True  # no decrease found: converged as far as this precision allows
        moved = ~stuck
        am = a[moved]
        s_vec = x_new[moved] - x[am]
        y_vec = g_new[moved] - g[am]
        sy = np.einsum("rp,rp->r", s_vec, y_vec)
        good = sy > 1e-10 * np.linalg.norm(s_vec, axis=1) * np.linalg.norm(y_vec, axis=1)
        s_hist[slot, a], y_hist[slot, a], rho[slot, a] = 0.0, 0.0, 0.0
        s_hist[slot, am[good]] = s_vec[good]
        y_hist[slot, am[good]] = y_vec[good]
        rho[slot, am[good]] = 1.0 / sy[good]
        gamma[am[good]] = sy[good] / np.einsum("rp,rp->r", y_vec[good], y_vec[good])
        f_old = f[am]
        x[am], f[am], g[am] = x_new[moved], f_new[moved], g_new[moved]
        first_step[am] = False
        iters[a] += 1
        small_df = (f_old - f[am]) <= ftol * np.maximum(np.maximum(np.abs(f_old), np.abs(f[am])), 1.0)
        small_g = np.abs(g[am]).max(axis=1) <= gtol
        done[am[small_df | small_g]] = True
        done[a[stuck]] = True
    return Result(x=x, fun=f, iterations=iters, converged=done)
