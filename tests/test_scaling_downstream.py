"""Downstream scaling across objectives: probe top-1 in collect, binned error-vs-compute fits per objective
(Cherti et al. 2023), and the per-objective figure."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from aimpre.cli import main
from aimpre.scaling.fit import fit_power
from aimpre.scaling.table import Columns, read_table
from helpers import jpeg, write_csv, write_tar


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _labelled(path: Path, n: int) -> str:
    """A real labelled shard: two classes, told apart by colour."""
    samples = [{"__key__": f"k{i:03d}", "jpg": jpeg((230, 20, 20) if i % 2 else (20, 20, 230)), "cls": str(i % 2)}
               for i in range(n)]  # fmt: skip
    return str(write_tar(path, samples))


def test_collect_probes_each_run_once_and_reads_the_objective(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real run probed on real labelled shards: top-1 columns, the objective column ("aimv2" for a config.yaml
    written before model.objective existed), the result kept in the run folder and reused on the next collect."""
    runs = tmp_path / "runs"
    run = Path(shutil.copytree(tiny_run, runs / "old"))
    config = (run / "config.yaml").read_text()
    assert "objective:" in config
    (run / "config.yaml").write_text("".join(x for x in config.splitlines(True) if "objective:" not in x))
    train, test = _labelled(tmp_path / "train.tar", 16), _labelled(tmp_path / "test.tar", 8)
    out = tmp_path / "results.csv"
    argv = ["scaling", "collect", str(runs), "--out", str(out), "--probe", f"{train},{test}", "--probe-epochs", "2"]
    assert main(argv) == 0
    assert "[1/1] old: probed" in capsys.readouterr().out  # the progress bar's lines
    (row,) = _read(out)
    assert row["objective"] == "aimv2"
    top1 = {k: float(row[f"probe_{k}_top1"]) for k in ("attentive", "linear")}
    assert all(0.0 <= v <= 1.0 for v in top1.values())
    (cached,) = run.glob("probe-*.json")
    doc = json.loads(cached.read_text())
    assert doc["settings"]["epochs"] == 2 and (doc["train"], doc["test"]) == (train, test)
    assert {k: doc["results"]["encoder"][k]["top1"] for k in top1} == top1
    stamp = cached.stat().st_mtime_ns

    assert main(argv) == 0  # again: the cached result, not a second probe
    assert "[1/1] old: probe result reused" in capsys.readouterr().out
    assert cached.stat().st_mtime_ns == stamp and _read(out) == [row]
    assert main([*argv[:-1], "3"]) == 0  # other settings: probed again, kept beside the first
    assert len(list(run.glob("probe-*.json"))) == 2

    assert main(["scaling", "collect", str(runs), "--out", str(tmp_path / "plain.csv")]) == 0  # no --probe
    (plain,) = _read(tmp_path / "plain.csv")
    assert plain["objective"] == "aimv2" and plain["probe_attentive_top1"] == ""
    assert main(["scaling", "collect", str(runs), "--probe", f"{train},{test},{test}"]) == 2
    assert "--probe takes TRAIN[,TEST]" in capsys.readouterr().err


def _runs(objective: str, beta: float, alpha: float, n: int = 24) -> list[dict]:
    """Rows as collect writes them: per compute C a best run on error = beta * C^alpha and two worse ones."""
    rows = []
    for j, c in enumerate(np.geomspace(1e14, 1e18, n)):
        err = beta * c**alpha
        for k, worse in enumerate((1.0, 1.15, 1.4)):
            rows.append({
                "run": f"{objective}-{j}-{k}", "objective": objective, "params": 1e6 * (k + 1), "samples": c / 6e6,
                "flops": c, "val_loss": 1.0 + err * worse, "probe_attentive_top1": 1 - err * worse,
                "probe_linear_top1": 1 - 1.2 * err * worse,
            })  # fmt: skip
    return rows


def test_binned_fit_recovers_beta_and_alpha(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Noiseless error = beta C^alpha under runs that do worse: the best run per bin lies on the law, and the
    least-squares line through those points returns beta and alpha."""
    src = write_csv(tmp_path / "t.csv", _runs("aimv2", 3.0, -0.08))
    out = tmp_path / "fit.json"
    argv = ["scaling", "fit", str(src), "--form", "power", "--no-e", "--y", "error_attentive", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Cherti et al. 2023" in text and "error = beta * C^alpha with beta = 3, alpha = -0.08" in text
    doc = json.loads(out.read_text())
    assert doc["params"]["A"] == pytest.approx(3.0, rel=1e-9) and doc["params"]["alpha"] == pytest.approx(0.08)
    assert doc["extra"]["rule"] == "bins" and doc["extra"]["bins"] == 5 and doc["n_points"] == 5  # Cherti's 5
    assert all(p.endswith("-0") for p in doc["extra"]["points"])  # each bin's best: the run on the law
    assert doc["columns"]["error"] == "probe_attentive_top1"
    assert main(["scaling", "predict", str(out), "--flops", "1e20", "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["loss_opt"]["value"] == pytest.approx(3.0 * 1e20**-0.08, rel=1e-9)


def test_bins_take_the_best_run_of_each_bin_not_the_frontier(tmp_path: Path) -> None:
    rows = [("a", 14.0, 0.50), ("b", 14.3, 0.40), ("c", 14.5, 0.45), ("d", 14.9, 0.30), ("e", 15.2, 0.35),
            ("f", 15.5, 0.33), ("g", 16.0, 0.20)]  # fmt: skip
    csv_rows = [{"run": r, "params": 1e6, "flops": 10**x, "probe_linear_top1": 1 - e} for r, x, e in rows]
    table = read_table(write_csv(tmp_path / "t.csv", csv_rows), Columns(d=None, error="probe_linear_top1"))
    binned = fit_power(table, with_e=False, bins=3)  # log10 C bins [14, 14.67), [14.67, 15.33), [15.33, 16]
    assert binned.extra["points"] == ["b", "d", "g"]
    assert [b["runs"] for b in binned.extra["per_bin"]] == [3, 2, 2]
    slope, intercept = np.polyfit([14.3, 14.9, 16.0], np.log10([0.40, 0.30, 0.20]), 1)
    assert binned.params["alpha"] == pytest.approx(-slope) and binned.params["A"] == pytest.approx(10**intercept)
    assert fit_power(table, with_e=False).extra["frontier"] == ["a", "b", "d", "g"]  # the loss's rule, unchanged
    boot = fit_power(table, with_e=False, bins=3, bootstrap=50)
    assert boot.ci["alpha"][0] <= binned.params["alpha"] <= boot.ci["alpha"][1]


def test_one_fit_per_objective(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A table of two objectives is fitted per objective by default, into one JSON and one report; --group none
    pools them."""
    src = write_csv(tmp_path / "t.csv", _runs("aimv2", 3.0, -0.08) + _runs("siglip", 5.0, -0.12))
    out = tmp_path / "fit.json"
    argv = ["scaling", "fit", str(src), "--form", "power", "--no-e", "--y", "error_linear"]
    assert main([*argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "objective aimv2:" in text and "objective siglip:" in text
    doc = json.loads(out.read_text())
    assert doc["group_column"] == "objective" and list(doc["fits"]) == ["aimv2", "siglip"]
    for name, beta, alpha in (("aimv2", 3.6, 0.08), ("siglip", 6.0, 0.12)):  # linear error is 1.2x
        fit = doc["fits"][name]
        assert fit["params"]["A"] == pytest.approx(beta, rel=1e-9) and fit["params"]["alpha"] == pytest.approx(alpha)
        assert all(p.startswith(name) for p in fit["extra"]["points"]) and fit["extra"]["group"] == {"objective": name}
    assert main(["scaling", "predict", str(out), "--group", "siglip", "--flops", "1e20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss_opt"]["value"] == pytest.approx(6.0 * 1e20**-0.12, rel=1e-9)
    assert main(["scaling", "predict", str(out), "--flops", "1e20"]) == 2
    assert "one fit per objective (aimv2, siglip); name one with --group" in capsys.readouterr().err
    assert main([*argv, "--group", "none", "--json", str(out)]) == 0
    assert "fits" not in json.loads(out.read_text())


def test_loss_keeps_the_frontier_and_bins_apply_to_it(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "t.csv", _runs("aimv2", 3.0, -0.08))
    out = tmp_path / "fit.json"
    assert main(["scaling", "fit", str(src), "--form", "power", "--json", str(out)]) == 0
    assert "rule" not in json.loads(out.read_text())["extra"]  # the loss: today's frontier fit
    assert main(["scaling", "fit", str(src), "--form", "power", "--bins", "4", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["extra"]["rule"] == "bins" and doc["n_points"] == 4 and "E" in doc["params"]


def test_bad_downstream_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _runs("aimv2", 3.0, -0.08)
    no_probe = write_csv(tmp_path / "a.csv", [{k: v for k, v in r.items() if not k.startswith("probe_")} for r in rows])
    fit = ["scaling", "fit", "--form", "power", "--no-e"]

    def refused(argv: list[str], *words: str) -> None:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own refusal of a flag's value
            code = e.code
        assert code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and all(w in err for w in words), err

    refused([*fit, str(no_probe), "--y", "error_attentive"], "no column 'probe_attentive_top1'", "collect --probe")
    refused([*fit, str(no_probe), "--y", "top1"], "--y", "error:COLUMN")
    good = write_csv(tmp_path / "b.csv", rows)
    refused([*fit, str(good), "--y", "error_attentive", "--bins", "1"], "--bins", "integer >= 2")
    chinchilla = ["scaling", "fit", str(good), "--form", "chinchilla", "--y", "error_attentive", "--bins", "3"]
    refused(chinchilla, "--bins applies to --form power")
    two = write_csv(tmp_path / "c.csv", [r for r in rows if r["flops"] in (1e14, 1e18)])  # two compute values
    refused([*fit, str(two), "--y", "error_attentive"], "--bins 5: only 2 of the 5", "needs 3 bins with runs")
    empty = write_csv(tmp_path / "d.csv", [{**rows[0], "probe_linear_top1": ""}, *rows[1:]])
    refused([*fit, str(empty), "--y", "error_linear"], "'probe_linear_top1', row 2 is empty")
    perfect = write_csv(tmp_path / "e.csv", [{**rows[0], "probe_linear_top1": 1.0}, *rows[1:]])
    refused([*fit, str(perfect), "--y", "error_linear"], "row 2", "[0, 1)")
    few = write_csv(tmp_path / "f.csv", _runs("aimv2", 3.0, -0.08) + _runs("clip", 4.0, -0.1, n=2))
    refused([*fit, str(few), "--y", "error_attentive"], "objective 'clip'", "--bins 5: only 2 of the 5")


def test_objectives_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One colour per objective: its runs, the bins' best runs highlighted, its fitted line; log-log axes."""
    from aimpre.scaling.plots import objectives_figure
    from aimpre.scaling.report import read_fits

    src = write_csv(tmp_path / "t.csv", _runs("aimv2", 3.0, -0.08) + _runs("siglip", 5.0, -0.12))
    fit = tmp_path / "fit.json"
    assert main(["scaling", "fit", str(src), "--form", "power", "--no-e", "--y", "error_attentive", "--json",
                 str(fit)]) == 0  # fmt: skip
    png = tmp_path / "objectives.png"
    assert main(["scaling", "plot", str(src), "--fit", str(fit), "--out", str(png)]) == 0
    assert png.stat().st_size > 10_000
    table = read_table(src, Columns(**{**read_fits(fit)["aimv2"].columns}))
    (ax,) = objectives_figure(table, read_fits(fit)).axes
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log") and ax.get_ylabel().startswith("error")
    by_label = {ln.get_label(): ln for ln in ax.lines}
    for name in ("aimv2", "siglip"):
        runs, best = by_label[f"{name}: runs"], by_label[f"{name}: best per bin"]
        line = next(ln for label, ln in by_label.items() if label.startswith(f"{name}: fit"))
        assert len(runs.get_xdata()) == 72 and len(best.get_xdata()) == 5
        assert runs.get_color() == best.get_color() == line.get_color()
    assert by_label["aimv2: runs"].get_color() != by_label["siglip: runs"].get_color()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(legend) == 6
    assert main(["scaling", "plot", str(src), "--y", "error_linear", "--out", str(png)]) == 0  # data only
    assert "wrote" in capsys.readouterr().out
