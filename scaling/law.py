"""Scaling laws as sums of power laws, fitted in log space: objectives, multi-start fits, allocation.

Every law here is ``L = sum_k exp(c_k) * x_k^-e_k`` (a constant term has no x), fitted through its log-sum-exp
form ``log L = LSE_k(c_k - e_k log x_k)``, which keeps the coefficients positive and the problem well scaled
(Hoffmann et al. 2022, App. D.2):

- chinchilla  ``L(N, D) = E + A / N^alpha + B / D^beta``   (a, b, e = log A, log B, log E)
- power       ``L(C) = E + A C^-alpha``, and without E     (a, e = log A, log E)

Objectives on the residuals r_i = log L_hat_i - log L_i:
- ``huber``: sum_i Huber_delta(r_i) with delta = 1e-3, Hoffmann et al.'s choice (robust to outliers);
- ``likelihood``: the negative log-likelihood of r under a Huber density of free scale sigma, Epoch AI's
  refit (Besiroglu et al. 2024, arXiv:2404.10102; its ``data_analysis.ipynb``); sigma is a sixth parameter;
- ``squares``: 0.5 sum_i r_i^2.
Rows can carry weights (counts), which is how bootstrap resamples are fitted all in one batch. The objective
runs in torch (CPU, float64) for its vectorised exp/log: about 3x numpy's speed on these [starts, points] arrays.

The optimiser sees huber / delta and squares / delta^2 (``unit``): the same minimiser, but an objective of order
n * |r| / delta rather than 1e-3, so L-BFGS's stopping tests, relative to max(|f|, 1), do not end a refit that
starts near the optimum (a bootstrap resample) after one step. Reported objective values are unscaled.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm
from torch import Tensor

from aimpre.scaling import lbfgs

OBJECTIVES = ("huber", "likelihood", "squares")


def ftol(kind: str) -> float:
    """L-BFGS's relative-decrease tolerance: scipy's default, except for the likelihood, whose value carries a
    large constant (n log sigma): relative to it, the decrease looks negligible long before the optimum. There
    the gradient test and the line search stop the optimiser (Epoch AI used BFGS, which has no such test)."""
    return 0.0 if kind == "likelihood" else 2.2e-9


def unit(kind: str, delta: float) -> float:
    """The factor the optimiser's objective carries (see the module docstring)."""
    return {"huber": 1.0 / delta, "squares": 1.0 / delta**2}.get(kind, 1.0)


@dataclass(frozen=True)
class Law:
    """``log L = LSE_k(theta[coef_k] - theta[exp_k] * log x[feat_k])``; exp_k/feat_k None for a constant term."""

    names: tuple[str, ...]  # parameter names in theta order (log-space coefficients: a, b, e)
    terms: tuple[tuple[int, int | None, int | None], ...]  # (coef index, exponent index, feature index)

    def log_predict(self, theta: np.ndarray, logx: np.ndarray) -> np.ndarray:
        """log L for parameters theta [R, P] at log features [n, F] -> [R, n]."""
        u = self._exponents(theta, logx)
        top = u.max(axis=1)
        return top + np.log(np.exp(u - top[:, None]).sum(axis=1))

    def _exponents(self, theta: np.ndarray, logx: np.ndarray) -> np.ndarray:
        """[R, K, n]: the log of each term."""
        out = np.empty((theta.shape[0], len(self.terms), logx.shape[0]))
        for k, (c, e, f) in enumerate(self.terms):
            out[:, k] = theta[:, c, None]
            if e is not None and f is not None:
                out[:, k] -= theta[:, e, None] * logx[None, :, f]
        return out


CHINCHILLA = Law(("a", "b", "e", "alpha", "beta"), ((0, 3, 0), (1, 4, 1), (2, None, None)))  # x = (N, D)
POWER = Law(("a", "e", "alpha"), ((0, 2, 0), (1, None, None)))  # x = (C,)
POWER_NO_E = Law(("a", "alpha"), ((0, 1, 0),))

# Hoffmann et al. 2022, App. D.2: alpha, beta in {0, .5, ..., 2}, e in {-1, -.5, ..., 1}, a, b in {0, 5, ..., 25}
CHINCHILLA_GRID = {
    "a": np.arange(0, 30, 5.0), "b": np.arange(0, 30, 5.0), "e": np.arange(-1, 1.5, 0.5),
    "alpha": np.arange(0, 2.5, 0.5), "beta": np.arange(0, 2.5, 0.5),
}  # fmt: skip
# power laws in compute: C spans 1e10..1e25, so exponents are small and a = log A is large
POWER_GRID = {"a": np.arange(0, 30, 2.5), "e": np.arange(-1, 1.5, 0.5), "alpha": np.array([0.02, 0.05, 0.1, 0.2, 0.5])}


def grid_starts(law: Law, grid: dict[str, np.ndarray]) -> np.ndarray:
    """Every combination of the grid values, [S, P] in the law's parameter order."""
    return np.array(list(itertools.product(*(grid[n] for n in law.names))), dtype=np.float64)


def huber_log_norm(delta: float) -> float:
    """log of the integral of exp(-Huber_delta(x)) over the real line (Epoch's normalising factor)."""
    return math.log(math.sqrt(2 * math.pi) * (1 - 2 * norm.sf(delta)) + 2 * math.exp(-0.5 * delta**2) / delta)


def objective(
    law: Law,
    logx: np.ndarray,
    logy: np.ndarray,
    kind: str = "huber",
    delta: float = 1e-3,
    weights: np.ndarray | None = None,
) -> lbfgs.Objective:
    """The objective (times ``unit``) and its analytic gradient, for ``lbfgs.minimize``.

    Args:
        law: the law.
        logx: [n, F] log features.
        logy: [n] log losses.
        kind: one of ``OBJECTIVES``; "likelihood" adds log sigma as the last parameter.
        delta: the Huber threshold.
        weights: [S, n] per-problem row weights (bootstrap counts), or None for all ones.
    """
    if kind not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {kind!r}")
    P = len(law.names)
    log_z = huber_log_norm(delta) if kind == "likelihood" else 0.0
    scale = unit(kind, delta)

    X = torch.from_numpy(np.ascontiguousarray(logx, dtype=np.float64))  # [n, F]
    Y = torch.from_numpy(np.ascontiguousarray(logy, dtype=np.float64))[None]  # [1, n]
    W = None if weights is None else torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float64))

    def fun(theta_np: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with one_thread():
            return evaluate(torch.from_numpy(theta_np), rows)

    def evaluate(theta: Tensor, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # log L_hat = log sum_k exp(u_k), summed directly: the laws' terms stay far from overflow at the data
        # (a step that overflows gives a non-finite f, which the line search rejects)
        terms = [_term(theta, X, c, e, feat) for c, e, feat in law.terms]  # each [R, n] or [R, 1]
        tot = terms[0] if len(terms) == 1 else sum(terms[1:], terms[0])
        r = torch.log(tot) - Y  # [R, n]
        w = None if W is None else W[torch.from_numpy(rows)]
        g = torch.zeros_like(theta)
        if kind == "squares":
            h, dr = 0.5 * r * r, r
        else:
            inv_sigma = torch.exp(-theta[:, P, None]) if kind == "likelihood" else None
            z = r if inv_sigma is None else r * inv_sigma
            a = z.abs()
            m = a.clamp(max=delta)
            h = m * (a - 0.5 * m)  # Huber: z^2 / 2 inside delta, delta (|z| - delta / 2) outside
            dz = torch.copysign(m, z)  # its derivative
            if inv_sigma is None:
                dr = dz
            else:  # -log density = Huber(r / sigma) + log sigma + log Z; d / d log sigma = 1 - Huber'(z) z
                dlog_sigma = 1.0 - dz * z
                g[:, P] = (dlog_sigma if w is None else dlog_sigma * w).sum(dim=1)
                h = h + (log_z + theta[:, P, None])
                dr = dz * inv_sigma
        if w is not None:
            h, dr = h * w, dr * w
        f = h.sum(dim=1)
        q = dr / tot  # d objective / d term_k = dr / L_hat (times term_k below)
        for t, (c, e, feat) in zip(terms, law.terms, strict=True):
            if t.shape[1] == 1:  # a constant term
                g[:, c] += t[:, 0] * q.sum(dim=1)
                continue
            gk = q * t  # [R, n]
            g[:, c] += gk.sum(dim=1)
            if e is not None and feat is not None:
                g[:, e] -= gk @ X[:, feat]
        return (f * scale).numpy(), (g * scale).numpy()

    return fun


def _term(theta: Tensor, X: Tensor, c: int, e: int | None, feat: int | None) -> Tensor:
    """exp(theta_c - theta_e log x_feat): [R, n], or [R, 1] for a constant term."""
    if e is None or feat is None:
        return torch.exp(theta[:, c, None])
    return torch.exp(theta[:, c, None] - theta[:, e, None] * X[None, :, feat])


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread (set per evaluation, ~1 us): the fits' arrays (1e3..1e6 elements) gain little
    from a second thread on an idle 2-core machine and lose 10x to 1000x when the cores are shared (measured at
    load 8 on 2 cores: 0.05 s vs 0.38 s per 4500 x 240 evaluation, 14 us vs 16 ms per 100 x 36 exp)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class MultiStart:
    theta: np.ndarray  # [P] the best optimum
    value: float  # its objective
    starts: int
    converged: int  # starts whose optimiser met a stopping test


def fit_multistart(
    law: Law, logx: np.ndarray, logy: np.ndarray, starts: np.ndarray, kind: str = "huber", delta: float = 1e-3
) -> MultiStart:
    """Runs L-BFGS from every start at once and keeps the best optimum.

    Args:
        law: the law.
        logx: [n, F] log features.
        logy: [n] log losses.
        starts: [S, P] starting points (P = the law's parameters; for "likelihood" log sigma is appended,
            started where it is optimal for the start's residuals).
        kind: the objective.
        delta: the Huber threshold.
    """
    x0 = np.asarray(starts, dtype=np.float64)
    if kind == "likelihood":
        x0 = np.concatenate([x0, initial_log_sigma(law, x0, logx, logy, delta)[:, None]], axis=1)
    res = lbfgs.minimize(objective(law, logx, logy, kind, delta), x0, ftol=ftol(kind))
    ok = np.isfinite(res.fun)
    if not ok.any():
        raise ValueError("every start diverged: the data do not support this law")
    best = int(np.flatnonzero(ok)[np.argmin(res.fun[ok])])
    return MultiStart(res.x[best], float(res.fun[best]) / unit(kind, delta), len(x0), int(res.converged.sum()))


def initial_log_sigma(law: Law, theta: np.ndarray, logx: np.ndarray, logy: np.ndarray, delta: float) -> np.ndarray:
    """The scale that maximises the Huber likelihood of each start's residuals in the linear (Laplace) regime:
    sigma = delta * mean |r| (for |r| / sigma > delta the density is exp(-delta |r| / sigma) / sigma)."""
    r = law.log_predict(theta, logx) - logy[None]
    return np.log(np.maximum(delta * np.abs(r).mean(axis=1), 1e-12))


def refit_weighted(
    law: Law, logx: np.ndarray, logy: np.ndarray, theta0: np.ndarray, weights: np.ndarray, kind: str, delta: float
) -> np.ndarray:
    """Refits every weighting (row of ``weights`` [K, n], e.g. bootstrap counts) from ``theta0``: [K, P]."""
    x0 = np.repeat(theta0[None], len(weights), axis=0)
    return lbfgs.minimize(objective(law, logx, logy, kind, delta, weights), x0, ftol=ftol(kind)).x


def chinchilla_params(theta: np.ndarray) -> dict[str, float]:
    """(a, b, e, alpha, beta[, log sigma]) -> {"E", "A", "B", "alpha", "beta"[, "sigma"]}."""
    E, A, B = (float(v) for v in np.exp(theta[[2, 0, 1]]))  # inf, not an exception, for a diverged refit
    out = {"E": E, "A": A, "B": B, "alpha": float(theta[3]), "beta": float(theta[4])}
    if len(theta) > 5:
        out["sigma"] = float(np.exp(theta[5]))
    return out


def chinchilla_loss(p: dict[str, float], n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    return p["E"] + p["A"] / np.power(n, p["alpha"]) + p["B"] / np.power(d, p["beta"])


def compute_optimal(p: dict[str, float], c: np.ndarray | float, k: float) -> tuple[np.ndarray, np.ndarray]:
    """N*(C), D*(C) minimising the Chinchilla law under C = k N D (Hoffmann et al. 2022, Eq. 4):
    N* = G (C/k)^(beta/(alpha+beta)), D* = (C/k) / N*, G = (alpha A / (beta B))^(1/(alpha+beta))."""
    s = p["alpha"] + p["beta"]
    g = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1.0 / s)
    n = g * np.power(np.asarray(c, dtype=np.float64) / k, p["beta"] / s)
    return n, np.asarray(c, dtype=np.float64) / (k * n)


def power_params(theta: np.ndarray, with_e: bool) -> dict[str, float]:
    """(a, e, alpha) or (a, alpha) -> {"E", "A", "alpha"} or {"A", "alpha"}."""
    if with_e:
        return {"E": float(np.exp(theta[1])), "A": float(np.exp(theta[0])), "alpha": float(theta[2])}
    return {"A": float(np.exp(theta[0])), "alpha": float(theta[1])}


def power_loss(p: dict[str, float], c: np.ndarray | float) -> np.ndarray:
    """L(C) = E + A C^-alpha (E = 0 for the form without it)."""
    return p.get("E", 0.0) + p["A"] * np.power(c, -p["alpha"])
