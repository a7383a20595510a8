"""The scaling figure (matplotlib's object API with the Agg canvas, no pyplot state; one PNG, four panels).

(a) loss vs compute, coloured by model size (one line per size when there are few), with the fitted frontier;
(b) iso-FLOP curves: loss vs N per budget, the fitted parabolas and their minima;
(c) the fitted law extrapolated past the data, with its bootstrap band;
(d) compute-optimal N*(C): from the fit (with band) and from the iso-FLOP minima.

``objectives_figure`` draws downstream error (or loss) against compute for several objectives on one pair of log
axes, one colour per objective: every run, the points each fit used (the best run per log-compute bin), the lines.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.legend_handler import HandlerTuple
from matplotlib.ticker import FormatStrFormatter

from aimpre.files import atomic_path
from aimpre.scaling import law as lw
from aimpre.scaling.fit import FitResult, bin_best, budget_rows, fit_isoflop, frontier, parabola
from aimpre.scaling.table import Table, TableError


def _frontier_curve(fit: FitResult, c: np.ndarray, params: dict[str, float] | None = None) -> np.ndarray:
    """Loss at compute-optimal allocation (Chinchilla form) or the power law in C."""
    p = params or fit.params
    if fit.form == "chinchilla":
        n, d = lw.compute_optimal(p, c, fit.flops_per_param)
        return lw.chinchilla_loss(p, n, d)
    return lw.power_loss(p, c)


def _band(fit: FitResult, c: np.ndarray, fn: str) -> tuple[np.ndarray, np.ndarray] | None:
    if not fit.samples:
        return None
    if fn == "loss":
        draws = np.array([_frontier_curve(fit, c, s) for s in fit.samples])
    else:
        draws = np.array([lw.compute_optimal(s, c, fit.flops_per_param)[0] for s in fit.samples])
    lo = (100.0 - fit.extra.get("ci_percent", 95.0)) / 2
    return np.percentile(draws, lo, axis=0), np.percentile(draws, 100 - lo, axis=0)


def _plain_loss_axis(ax: Axes, lo: float, hi: float) -> None:
    """Limits a log-scale loss axis to [lo, hi]; under a decade, labels it 2, 3, 4 rather than 2x10^0."""
    ax.set_ylim(lo, hi)
    if hi / lo < 10:
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))


def _legend(ax: Axes, **kwargs: Any) -> None:
    """A legend with one entry per label: artists sharing a label (a budget's points and parabola, every held-out
    star) share the entry. Every line carries a label, so every line is explained."""
    by_label: dict[str, list] = {}
    for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
        by_label.setdefault(label, []).append(handle)
    handles = [tuple(h[:2]) for h in by_label.values()]  # two suffice: points and line
    ax.legend(handles, list(by_label), handler_map={tuple: HandlerTuple(ndivide=None)}, fontsize=8, **kwargs)


def _held(fit: FitResult | None) -> list[dict]:
    return fit.extra.get("holdout", []) if fit else []


def _panel_compute(ax: Axes, table: Table, fit: FitResult | None) -> None:
    sizes = np.unique(table.n)
    cmap = matplotlib.colormaps["viridis"]
    norm = LogNorm(table.n.min(), table.n.max() * 1.0001)
    if len(sizes) <= 12:
        for n in sizes:
            i = np.flatnonzero(table.n == n)
            i = i[np.argsort(table.c[i])]
            ax.plot(table.c[i], table.loss[i], "o-", ms=4, color=cmap(norm(n)), label=f"N={n:.3g}")
    else:
        sc = ax.scatter(table.c, table.loss, c=table.n, norm=norm, cmap=cmap, s=10)
        ax.figure.colorbar(sc, ax=ax, label="N")
    if fit and fit.form in ("chinchilla", "power"):
        c = np.geomspace(table.c.min(), table.c.max(), 100)
        ax.plot(c, _frontier_curve(fit, c), "k--", lw=1.5, label="fitted frontier")
    for h in _held(fit):
        ax.plot(h["C"], h["loss"], "r*", ms=12, zorder=5, label="held out")
    if ax.get_legend_handles_labels()[0]:
        _legend(ax, ncol=2)
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="loss", title="(a) loss vs compute")
    _plain_loss_axis(ax, table.loss.min() / 1.3, table.loss.max() * 1.3)


def _panel_isoflop(ax: Axes, table: Table, budgets: list[float] | None, tol: float, note: str | None) -> None:
    cmap = matplotlib.colormaps["plasma"]
    shown = budget_rows(table, budgets, tol)
    budget_c = [float(np.exp(np.log(table.c[i]).mean())) for i in shown]
    many = len(shown) > 10  # an entry per budget would not fit: colour by C, explained by a colour bar
    norm = LogNorm(min(budget_c), max(budget_c) * 1.0001) if shown else None
    minima = []
    for j, i in enumerate(shown):
        color = cmap(norm(budget_c[j]) if many and norm else j / max(1, len(shown)))
        logn = np.log(table.n[i])
        q = parabola(logn, table.loss[i])
        if many:
            label = "iso-FLOP budget (colour: C)" if q is not None else "concave budget: dropped"
        else:
            label = f"C={budget_c[j]:.2g}" + (" (concave: dropped)" if q is None else "")
        ax.plot(table.n[i], table.loss[i], "o", ms=4, color=color, label=label)
        if q is not None:
            x = np.linspace(logn.min(), logn.max(), 50)
            ax.plot(np.exp(x), np.polyval(q, x), "-", color=color, label=label)
            xm = -q[1] / (2 * q[0])
            if logn.min() <= xm <= logn.max():  # a minimum outside the sampled sizes is not one
                minima.append((np.exp(xm), np.polyval(q, xm)))
    if minima:
        ax.plot(*zip(*minima, strict=True), "kx", ms=8, mew=2, ls="", label="parabola minimum")
    if many:
        ax.figure.colorbar(ScalarMappable(norm, cmap), ax=ax, label="budget C")
    why = textwrap.fill(note, 50) if note else None  # why there is no iso-FLOP fit
    if not shown:
        ax.text(0.5, 0.5, "no budget with 3+ sizes", ha="center", transform=ax.transAxes)
        if why:
            ax.text(0.02, 0.98, why, transform=ax.transAxes, fontsize=8, va="top")
    else:  # the reason heads the legend, which matplotlib places off the data
        _legend(ax, loc="best", title=why, title_fontsize=8)
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss", title="(b) iso-FLOP curves, minima x")


def _panel_extrapolate(ax: Axes, table: Table, fit: FitResult | None, factor: float) -> None:
    ax.plot(table.c, table.loss, ".", color="0.6", label="runs")
    central = None
    if fit and fit.form in ("chinchilla", "power"):
        c = np.geomspace(table.c.min(), table.c.max() * factor, 200)
        central = _frontier_curve(fit, c)
        ax.plot(c, central, "k-", label=f"{fit.form} fit")
        band = _band(fit, c, "loss")
        if band is not None:
            ci = fit.extra.get("ci_percent", 95.0)
            ax.fill_between(c, band[0], band[1], color="C0", alpha=0.3, label=f"{ci:g}% bootstrap band")
        ax.axvline(table.c.max(), color="0.5", ls=":", lw=1, label="largest compute in the data")
    if fit and fit.form == "power":
        idx = frontier(table)
        ax.plot(table.c[idx], table.loss[idx], "ko", ms=3, label="frontier")
    for h in _held(fit):
        ax.plot(h["C"], h["loss"], "r*", ms=12, zorder=5, label="held out")
    _legend(ax)
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="loss", title="(c) law extrapolated")
    lo = table.loss.min() if central is None else min(table.loss.min(), central.min())
    _plain_loss_axis(ax, lo / 1.5, table.loss.max() * 1.3)  # a wide band is clipped, not the data


def _panel_nopt(ax: Axes, table: Table, fit: FitResult | None, iso: FitResult | None, factor: float) -> None:
    c = np.geomspace(table.c.min(), table.c.max() * factor, 100)
    if fit and fit.form == "chinchilla":
        ax.plot(c, lw.compute_optimal(fit.params, c, fit.flops_per_param)[0], "k-", label="Chinchilla-form fit")
        band = _band(fit, c, "n")
        if band is not None:
            ci = fit.extra.get("ci_percent", 95.0)
            ax.fill_between(c, band[0], band[1], color="C0", alpha=0.3, label=f"{ci:g}% bootstrap band")
    if iso is not None:
        b = [x for x in iso.extra["budgets"] if x["inside"]]
        ax.plot([x["C"] for x in b], [x["N_opt"] for x in b], "s", color="C3", label="iso-FLOP minima")
        ax.plot(c, iso.params["kN"] * c ** iso.params["a"], "--", color="C3", label=f"C^{iso.params['a']:.2f}")
    if ax.get_legend_handles_labels()[0]:
        _legend(ax)
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="N*", title="(d) compute-optimal N*(C)")


DPI = 150


def plot_scaling(
    table: Table,
    fit: FitResult | None,
    out: str | Path,
    budgets: list[float] | None = None,
    tol: float = 0.15,
    extrapolate: float = 100.0,
    title: str | None = None,
) -> Path:
    """Writes the four-panel figure (``scaling_figure``) as a PNG at ``DPI``.

    Args:
        table: the runs.
        fit: a Chinchilla-form or power fit (None: data only).
        out: the PNG path.
        budgets: iso-FLOP budgets (None: grouped automatically, see ``fit.group_budgets``).
        tol: the budget tolerance.
        extrapolate: how far past the largest compute panels (c) and (d) go, as a factor.
        title: the figure title.
    """
    fig = scaling_figure(table, fit, budgets, tol, extrapolate, title)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return Path(out)


def scaling_figure(
    table: Table,
    fit: FitResult | None,
    budgets: list[float] | None = None,
    tol: float = 0.15,
    extrapolate: float = 100.0,
    title: str | None = None,
) -> Figure:
    """The four panels (arguments as ``plot_scaling``)."""
    fig = Figure(figsize=(10, 8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    try:
        iso, note = fit_isoflop(table, budgets, tol), None
    except TableError as e:
        iso, note = None, f"no iso-FLOP fit: {e}"
    _panel_compute(axes[0, 0], table, fit)
    _panel_isoflop(axes[0, 1], table, budgets, tol, note)
    _panel_extrapolate(axes[1, 0], table, fit, extrapolate)
    _panel_nopt(axes[1, 1], table, fit, iso, extrapolate)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _fit_label(fit: FitResult) -> str:
    p = fit.params
    if fit.form != "power":
        return f"{fit.form} fit"
    law = f"{p['A']:.3g} C^-{p['alpha']:.3f}"
    return f"fit {p['E']:.3g} + {law}" if "E" in p else f"fit {law}"


def objectives_figure(table: Table, fits: dict[str, FitResult], bins: int = 5, title: str | None = None) -> Figure:
    """Error (or loss) vs compute, one colour per group of the table (e.g. objective), log-log.

    Args:
        table: the runs (``table.groups`` names each row's objective; no groups: one series).
        fits: power fits by group name (``report.fit_groups``); a group without one shows its points only.
        bins: for a group without a fit: highlight the best run of each of this many log10-C bins.
        title: the figure title.
    """
    fig = Figure(figsize=(8, 6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for j, (name, part) in enumerate(table.by_group().items()):
        colour, who = f"C{j % 10}", name or "runs"
        ax.plot(part.c, part.loss, "o", ms=4, alpha=0.4, color=colour, ls="", label=f"{who}: runs")
        fit = fits.get(name)
        if fit is not None:  # the points the fit used (bins' best or the frontier), by run label
            used = set(fit.extra.get("points") or fit.extra.get("frontier") or [])
            chosen = np.array([i for i, label in enumerate(part.labels) if label in used], dtype=np.int64)
            what = "best per bin" if fit.extra.get("rule") == "bins" else "frontier"
        else:
            chosen, what = bin_best(part, bins)[0], "best per bin"
        ax.plot(part.c[chosen], part.loss[chosen], "o", ms=9, color=colour, mec="k", mew=1.2, ls="",
                label=f"{who}: {what}")  # fmt: skip
        if fit is not None and fit.form == "power":
            c = np.geomspace(part.c.min(), part.c.max(), 100)
            ax.plot(c, lw.power_loss(fit.params, c), "-", color=colour, lw=1.8, label=f"{who}: {_fit_label(fit)}")
    _legend(ax)
    ylabel = table.columns.y_name()
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=ylabel,
           title=title or f"{ylabel} vs compute" + (f" by {table.columns.group}" if table.groups else ""))  # fmt: skip
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    return fig


def plot_objectives(
    table: Table, fits: dict[str, FitResult], out: str | Path, bins: int = 5, title: str | None = None
) -> Path:
    """Writes ``objectives_figure`` as a PNG at ``DPI`` (arguments as there)."""
    fig = objectives_figure(table, fits, bins, title)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return Path(out)
