"""Law fits on synthetic data from known laws (noise and outliers), the optimiser, and bad tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize

from aimpre.bench.fit import plain_objective
from aimpre.cli import main
from aimpre.scaling import law as lw
from aimpre.scaling.fit import fit_chinchilla, fit_isoflop, fit_power
from aimpre.scaling.predict import predict
from aimpre.scaling.report import fit_table, read_json, write_json
from aimpre.scaling.table import Columns, Table, TableError, read_table
from helpers import write_csv

TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al.'s law


def _table(n: np.ndarray, d: np.ndarray, loss: np.ndarray, k: float = 6.0) -> Table:
    return Table(n, d, k * n * d, loss, [str(i) for i in range(len(n))], Columns(), k)


def _grid_data(seed: int = 0, outliers: int = 4) -> Table:
    """6 sizes x 6 data amounts from the Chinchilla law, 0.5% log-normal noise, a few +30% outliers."""
    rng = np.random.default_rng(seed)
    n, d = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e9, 6), np.geomspace(1e8, 1e10, 6)))
    loss = lw.chinchilla_loss(TRUE, n, d) * np.exp(rng.normal(0, 0.005, n.size))
    loss[rng.choice(n.size, outliers, replace=False)] *= 1.3
    return _table(n, d, loss)


def _rel(p: dict[str, float]) -> dict[str, float]:
    return {k: abs(p[k] - TRUE[k]) / TRUE[k] for k in TRUE}


def test_chinchilla_recovers_the_law_despite_outliers() -> None:
    table = _grid_data()
    starts = lw.grid_starts(lw.CHINCHILLA, lw.CHINCHILLA_GRID)[::3]  # a third of Hoffmann's grid: faster
    huber = fit_chinchilla(table, bootstrap=100, seed=1, starts=starts)
    # 36 points with 0.5% noise pin the law down to a few percent (E, exponents) and ~20% (A, B): the
    # tolerances are what held for every seed tried (0-3), with or without the outliers
    err = _rel(huber.params)
    assert err["E"] < 0.06 and err["alpha"] < 0.08 and err["beta"] < 0.08 and err["A"] < 0.4 and err["B"] < 0.4
    for k in TRUE:  # the bootstrap interval covers the truth and is not degenerate
        lo, hi = huber.ci[k]
        assert lo < TRUE[k] < hi and hi - lo > 1e-3 * TRUE[k], (k, lo, hi)
    squares = fit_chinchilla(table, "squares", starts=starts)  # least squares is dragged off by the outliers
    assert _rel(squares.params)["E"] > max(0.15, 3 * err["E"])
    mle = fit_chinchilla(table, "likelihood", starts=starts)  # Epoch's Huber likelihood (free scale): robust too
    assert _rel(mle.params)["E"] < 0.06 and mle.params["sigma"] > 0


def test_batched_lbfgs_matches_a_scipy_loop() -> None:
    """Same objective, same starts: the batched optimiser reaches scipy L-BFGS-B's optimum from each start."""
    table = _grid_data(seed=3)
    logx, logy = np.log(np.stack([table.n, table.d], 1)), np.log(table.loss)
    starts = lw.grid_starts(lw.CHINCHILLA, lw.CHINCHILLA_GRID)[::300]
    ours = lw.lbfgs.minimize(lw.objective(lw.CHINCHILLA, logx, logy), starts)
    fun = plain_objective(logx[:, 0], logx[:, 1], logy)
    with np.errstate(all="ignore"):
        theirs = np.array([minimize(fun, s, jac=True, method="L-BFGS-B").fun for s in starts])
    assert ours.fun.min() == pytest.approx(theirs.min(), rel=1e-6)
    assert (ours.fun <= theirs * (1 + 1e-4) + 1e-9).mean() > 0.8  # and rarely stops worse, start by start


@pytest.mark.parametrize("kind", lw.OBJECTIVES)
def test_objective_gradient_is_exact(kind: str) -> None:
    rng = np.random.default_rng(0)
    logx, logy = np.log(rng.uniform(1e6, 1e9, (20, 2))), np.log(rng.uniform(2, 3, 20))
    P = 6 if kind == "likelihood" else 5
    theta = np.column_stack([rng.uniform(3, 6, (4, 2)), rng.uniform(0, 1, 4), rng.uniform(0.2, 0.5, (4, 2))])
    if kind == "likelihood":
        theta = np.column_stack([theta, np.full(4, np.log(3e-5))])
    weights = rng.integers(0, 3, (4, 20)).astype(float)
    fun = lw.objective(lw.CHINCHILLA, logx, logy, kind, weights=weights)
    rows = np.arange(4)
    _, g = fun(theta, rows)
    for j in range(P):
        h = np.zeros_like(theta)
        h[:, j] = 1e-6
        numeric = (fun(theta + h, rows)[0] - fun(theta - h, rows)[0]) / 2e-6
        np.testing.assert_allclose(g[:, j], numeric, rtol=1e-4, atol=1e-6 * np.abs(numeric).max())


def test_power_law_on_the_compute_frontier() -> None:
    rng = np.random.default_rng(0)
    c = np.geomspace(1e15, 1e21, 14)
    best = 1.5 + 50.0 * c**-0.1
    loss = np.concatenate([best * np.exp(rng.normal(0, 0.002, c.size)), best * 1.2])  # + runs off the frontier
    table = _table(np.full(2 * c.size, 1e8), np.concatenate([c, c]) / 6e8, loss)
    fit = fit_power(table, bootstrap=50)
    assert fit.n_points == c.size
    assert fit.params["alpha"] == pytest.approx(0.1, abs=0.01) and fit.params["E"] == pytest.approx(1.5, rel=0.02)
    no_e = fit_power(table, with_e=False)
    assert set(no_e.params) == {"A", "alpha"} and no_e.params["alpha"] < 0.1  # a pure power law flattens
    assert predict(fit, flops=1e22)["loss_opt"]["value"] == pytest.approx(1.5 + 50.0 * 1e22**-0.1, rel=0.01)


def test_isoflop_and_compute_optimal_allocation() -> None:
    """Iso-FLOP parabolas recover N* ~ C^(beta/(alpha+beta)); the Chinchilla allocation is the true argmin."""
    n_opt, _ = lw.compute_optimal(TRUE, 1e19, 6.0)
    scan = np.geomspace(n_opt / 10, n_opt * 10, 20001)
    assert scan[np.argmin(lw.chinchilla_loss(TRUE, scan, 1e19 / (6 * scan)))] == pytest.approx(n_opt, rel=1e-3)
    rng = np.random.default_rng(0)
    rows = []
    for c in (1e17, 1e18, 1e19, 1e20):
        centre = lw.compute_optimal(TRUE, c, 6.0)[0]
        for n in centre * np.geomspace(0.25, 4, 7):
            rows.append((n, c / (6 * n), c))
    n, d, c = (np.array(v) for v in zip(*rows, strict=True))
    loss = lw.chinchilla_loss(TRUE, n, d) * np.exp(rng.normal(0, 0.001, n.size))
    fit = fit_isoflop(Table(n, d, c, loss, [""] * n.size, Columns(), 6.0), bootstrap=50)
    assert fit.params["a"] == pytest.approx(0.28 / 0.62, abs=0.02)
    assert fit.params["a"] + fit.params["b"] == pytest.approx(1.0, abs=1e-6)  # D* = C / (6 N*)
    assert fit.ci["a"][0] < fit.params["a"] < fit.ci["a"][1]
    got = predict(fit, flops=1e21)["N_opt"]["value"]
    assert got == pytest.approx(float(lw.compute_optimal(TRUE, 1e21, 6.0)[0]), rel=0.15)


def test_cli_fit_json_predict_and_holdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = _grid_data(seed=2, outliers=0)
    rows = [{"run": f"r{i}", "params": t.n[i], "flops": t.c[i], "val_loss": t.loss[i]} for i in range(len(t))]
    src = write_csv(tmp_path / "t.csv", rows)
    out = tmp_path / "fit.json"
    assert main(["scaling", "fit", str(src), "--n", "params", "--c", "flops", "--holdout", "2", "--bootstrap",
                 "20", "--json", str(out)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    assert {"form", "params", "ci", "n_points", "objective"} <= set(doc) and doc["n_points"] == len(t) - 2
    assert set(doc["params"]) == set(TRUE) and set(doc["ci"]) == set(TRUE)
    held = doc["extra"]["holdout"]
    assert [h["label"] for h in held] == [f"r{i}" for i in np.argsort(t.c)[-2:]]  # the largest compute
    assert all(abs(h["rel_error"]) < 0.02 for h in held)
    assert "D = C / (6 N)" in capsys.readouterr().out
    assert main(["scaling", "predict", str(out), "--flops", "1e21", "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["D_per_N"]["value"] == pytest.approx(pred["D_opt"]["value"] / pred["N_opt"]["value"])
    fit = read_json(out)
    write_json(fit, tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == doc
    assert main(["scaling", "plot", str(src), "--fit", str(out), "--out", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").stat().st_size > 10_000


def test_bad_tables_are_rejected_naming_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _grid_data(outliers=0)
    rows = [{"params": good.n[i], "samples": good.d[i], "flops": good.c[i], "val_loss": good.loss[i]}
            for i in range(len(good))]  # fmt: skip

    def table(name: str, rs: list[dict], **cols: str | None) -> Table:
        return read_table(write_csv(tmp_path / name, rs), Columns(**cols) if cols else Columns())

    with pytest.raises(TableError, match=r"no column 'val_loss'.*params, samples, flops"):
        table("a.csv", [{k: v for k, v in r.items() if k != "val_loss"} for r in rows])
    with pytest.raises(TableError, match=r"column 'samples', row 3: 'abc' is not a number"):
        table("b.csv", [rows[0], {**rows[1], "samples": "abc"}, *rows[2:]])
    with pytest.raises(TableError, match=r"column 'val_loss', row 2: '-1.0' must be a positive"):
        table("c.csv", [{**rows[0], "val_loss": -1.0}, *rows[1:]])
    with pytest.raises(TableError, match=r"column 'params', row 4: '' must be|column 'params', row 4: '' is not"):
        table("d.csv", [*rows[:2], {**rows[2], "params": ""}, *rows[3:]])
    with pytest.raises(TableError, match="at least two of the N, D, C"):
        table("e.csv", rows, n="params", d=None, c=None)
    with pytest.raises(TableError, match="at least 8 rows"):
        fit_chinchilla(table("f.csv", rows[:5]))
    one_size = [{**r, "params": 1e8} for r in rows]
    with pytest.raises(TableError, match="one model size only"):
        fit_chinchilla(table("g.csv", one_size))
    with pytest.raises(TableError, match="3 or more model sizes"):
        fit_isoflop(table("h.csv", rows[:12]))  # 2 sizes per budget at most
    rising = [{**r, "val_loss": 1.0 + i} for i, r in enumerate(sorted(rows, key=lambda r: r["flops"]))]
    with pytest.raises(TableError, match="compute frontier"):
        fit_power(table("i.csv", rising))
    (tmp_path / "j.csv").write_text("params,samples,flops,val_loss\n")
    with pytest.raises(TableError, match="has no rows"):
        read_table(tmp_path / "j.csv")
    with pytest.raises(TableError, match="holdout"):
        fit_table(good, "chinchilla", holdout=len(good))
    # through the command line: exit code 2 and one line naming the column, no traceback
    assert main(["scaling", "fit", str(tmp_path / "a.csv")]) == 2
    err = capsys.readouterr().err
    assert "no column 'val_loss'" in err and "Traceback" not in err


def test_tol_grouping_does_not_chain() -> None:
    """Runs 10% apart used to chain into one budget spanning 2x at tol 0.15; each budget now spans at most 1 + tol."""
    from aimpre.scaling.fit import group_budgets

    c = np.append(3.6e17 * 1.1 ** np.arange(8), 7.4e17)
    groups = group_budgets(c, None, 0.15)
    assert groups.max() >= 3
    for g in range(groups.max() + 1):
        members = c[groups == g]
        assert members.max() <= members.min() * 1.15
    assert list(group_budgets(np.array([1e18, 1.1e18, 5e18]), [1e18, 4.5e18], 0.15)) == [0, 0, 1]


def _isoflop_rows(concave: bool) -> list[dict]:
    """7 sizes on each of 3 budgets from the Chinchilla law; optionally a 4th budget whose loss is concave in N."""
    rows = []
    for c in (1e17, 1e18, 1e19):
        centre = lw.compute_optimal(TRUE, c, 6.0)[0]
        for n in centre * np.geomspace(0.25, 4, 7):
            rows.append({"run": f"c{c:.0e}-n{n:.3g}", "params": n, "flops": c,
                         "val_loss": float(lw.chinchilla_loss(TRUE, n, c / (6 * n)))})  # fmt: skip
    if concave:
        for x in np.linspace(-1, 1, 5):
            rows.append({"run": f"concave{x:+.1f}", "params": 1e9 * np.exp(x), "flops": 1e20, "val_loss": 3 - x * x})
    return rows


def test_concave_budgets_are_listed_and_not_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _isoflop_rows(concave=True)
    src = write_csv(tmp_path / "t.csv", rows)
    assert main(["scaling", "fit", str(src), "--n", "params", "--c", "flops", "--form", "isoflop"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("isoflop fit on 21 points")  # the concave budget's 5 rows are not counted
    assert "budget C=1e+20: no minimum  (concave, no minimum in N: dropped, its 5 points not counted)" in out
    fit = fit_isoflop(read_table(src, Columns(d=None)))
    assert fit.n_points == 21 and fit.extra["dropped_rows"] == 5
    assert [b["used"] for b in fit.extra["budgets"]] == [True, True, True, False]


def test_budgets_print_the_rows_they_drop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [*_isoflop_rows(concave=False), {"run": "stray", "params": 1e8, "flops": 5e17, "val_loss": 3.0}]
    src = write_csv(tmp_path / "t.csv", rows)
    argv = ["scaling", "fit", str(src), "--n", "params", "--c", "flops", "--form", "isoflop"]
    assert main([*argv, "--budgets", "1e17", "1e18", "1e19"]) == 0
    out = capsys.readouterr().out
    assert "not used: stray (C=5e+17): C is not within a factor 1.15 of any of --budgets" in out
    assert out.startswith("isoflop fit on 21 points")
    assert main(argv) == 0  # grouped by --tol: the stray row is a budget of one size
    assert "not used: stray (C=5e+17): its budget (C~5e+17) has fewer than 3 model sizes" in capsys.readouterr().out


def test_csv_with_a_byte_order_mark(tmp_path: Path) -> None:
    rows = _isoflop_rows(concave=False)
    src = tmp_path / "excel.csv"
    with open(src, "w", newline="", encoding="utf-8-sig") as f:  # what Excel's "CSV UTF-8" writes
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert src.read_bytes().startswith(b"\xef\xbb\xbf")
    table = read_table(src, Columns(n="params", d=None, c="flops"))
    assert len(table) == 21 and table.labels[0] == rows[0]["run"]


def test_scaling_figure_is_legible(tmp_path: Path) -> None:
    """150 dpi, legends in 8 pt or more, and every line carries a legend label."""
    from matplotlib.lines import Line2D
    from PIL import Image

    from aimpre.scaling.plots import plot_scaling, scaling_figure

    iso = read_table(write_csv(tmp_path / "iso.csv", _isoflop_rows(concave=True)), Columns(d=None))
    fit = fit_table(_grid_data(outliers=0), "power", bootstrap=20, holdout=2)
    for table, f in ((iso, None), (_grid_data(outliers=0), fit)):
        fig = scaling_figure(table, f)
        for ax in fig.axes:
            if not ax.lines:
                continue
            unlabelled = [ln for ln in ax.lines if ln.get_label().startswith("_")]
            assert not unlabelled, (ax.get_title(), unlabelled)
            legend = ax.get_legend()
            assert legend is not None and all(t.get_fontsize() >= 8 for t in legend.get_texts()), ax.get_title()
            assert all(isinstance(ln, Line2D) for ln in ax.lines)
    many = []  # 15 budgets: an entry each would not fit; colour by C, one legend entry for all
    for c in np.geomspace(1e17, 1e21, 15):
        centre = lw.compute_optimal(TRUE, c, 6.0)[0]
        many += [(n, c, float(lw.chinchilla_loss(TRUE, n, c / (6 * n)))) for n in centre * np.geomspace(0.3, 3, 5)]
    n, c, loss = (np.array(v) for v in zip(*many, strict=True))
    panel = scaling_figure(Table(n, c / (6 * n), c, loss, [""] * n.size, Columns(), 6.0), None).axes[1]
    assert [t.get_text() for t in panel.get_legend().get_texts()] == ["iso-FLOP budget (colour: C)", "parabola minimum"]
    assert any(ax.get_ylabel() == "budget C" for ax in panel.figure.axes)  # the colour bar
    out = plot_scaling(iso, None, tmp_path / "s.png")
    with Image.open(out) as img:
        assert min(img.info["dpi"]) >= 149.9 and img.size[0] >= 1400
