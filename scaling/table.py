"""Reading a results table (CSV) into the arrays a scaling-law fit needs, refusing what it cannot support.

A table has one row per training run. Four quantities matter: N (parameters), D (samples or tokens seen),
C (training FLOPs) and the loss; ``Columns`` names the CSV column of each. Any two of N, D, C give the third
through C = k N D, where k is the training FLOPs per parameter per sample (6 for a language model counting
tokens, Kaplan et al. 2020: 2 forward + 4 backward per parameter). When only N and C are given, D = C / (k N)
with ``flops_per_param`` k = 6 unless overridden (what Hoffmann et al. 2022 and Epoch AI do for Chinchilla);
for AIMv2 the per-sample FLOPs are counted exactly (``aimpre.scaling.flops``) and the table carries D itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aimpre import files


class TableError(ValueError):
    """The table cannot support the requested fit; the message names the column, row or condition."""


@dataclass(frozen=True)
class Columns:
    """CSV column names; None where the table does not have that quantity."""

    n: str | None = "params"
    d: str | None = "samples"
    c: str | None = "flops"
    loss: str = "val_loss"
    label: str | None = None  # a column naming each row, carried into reports (None: "run" if present)
    # a top-1 column (a fraction in 0..1, e.g. collect --probe's probe_attentive_top1): when set, the fitted
    # quantity is the error 1 - top-1 rather than the loss column (Cherti et al. 2023 fit downstream error)
    error: str | None = None
    group: str | None = None  # a column splitting the rows into separate fits (e.g. "objective")

    def y_name(self) -> str:
        """What the fitted quantity is, for reports and axis labels."""
        return f"error (1 - {self.error})" if self.error else self.loss


@dataclass
class Table:
    """Validated positive float arrays, one entry per row; ``c`` = k n d where it was not in the CSV."""

    n: np.ndarray
    d: np.ndarray
    c: np.ndarray
    loss: np.ndarray
    labels: list[str]
    columns: Columns
    flops_per_param: float  # k in C = k N D: the value used to derive a missing column, else the median
    notes: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # each row's value of ``columns.group`` (empty: no grouping)

    def __len__(self) -> int:
        return len(self.loss)

    def subset(self, keep: np.ndarray) -> Table:
        """The rows where ``keep`` (a boolean mask or index array) holds."""
        rows = np.arange(len(self))[keep]
        return Table(
            self.n[keep], self.d[keep], self.c[keep], self.loss[keep], [self.labels[i] for i in rows],
            self.columns, self.flops_per_param, self.notes, [self.groups[i] for i in rows] if self.groups else [],
        )  # fmt: skip

    def by_group(self) -> dict[str, Table]:
        """One table per value of the group column, in order of first appearance (no grouping: {"": self})."""
        if not self.groups:
            return {"": self}
        names = list(dict.fromkeys(self.groups))
        return {g: self.subset(np.array([x == g for x in self.groups])) for g in names}


def _column(rows: list[dict[str, str]], name: str, path: Path, header: list[str]) -> np.ndarray:
    if name not in header:
        raise TableError(f"{path}: no column {name!r}; the columns are: {', '.join(header)}")
    out = np.empty(len(rows))
    for i, r in enumerate(rows):
        text = (r.get(name) or "").strip()
        try:
            v = float(text)
        except ValueError:
            raise TableError(f"{path}: column {name!r}, row {i + 2}: {text!r} is not a number") from None
        if not math.isfinite(v) or v <= 0:
            raise TableError(f"{path}: column {name!r}, row {i + 2}: {text!r} must be a positive finite number")
        out[i] = v
    return out


def read_table(path: str | Path, columns: Columns = Columns(), flops_per_param: float | None = None) -> Table:
    """Reads and validates a CSV table.

    Args:
        path: the CSV file (a header row, then one row per run).
        columns: which column holds N, D, C and the loss; at least two of N, D, C are needed.
        flops_per_param: k in C = k N D, used to derive a missing column (default 6); when all three are given
            it only overrides the value stored for compute-optimal allocation (default: the median of C/(N D)).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"table not found: {p}")
    rows = files.read_csv(p, "table")  # bounded: size, rows, field length; a FIFO is refused
    header = list(rows[0]) if rows else []
    if not rows:
        raise TableError(f"{p}: the table has no rows")
    given = {k: getattr(columns, k) for k in ("n", "d", "c") if getattr(columns, k)}
    if len(given) < 2:
        raise TableError(f"{p}: need at least two of the N, D, C columns (--n, --d, --c); got {given or 'none'}")
    vals = {k: _column(rows, name, p, header) for k, name in given.items()}
    loss = _error(rows, columns.error, p, header) if columns.error else _column(rows, columns.loss, p, header)
    notes = []
    k = 6.0 if flops_per_param is None else float(flops_per_param)
    if k <= 0:
        raise TableError(f"flops_per_param must be positive, got {k}")
    if "c" not in vals:
        vals["c"] = k * vals["n"] * vals["d"]
        notes.append(f"C = {k:g} N D (no C column)")
    elif "d" not in vals:
        vals["d"] = vals["c"] / (k * vals["n"])
        notes.append(f"D = C / ({k:g} N) (no D column)")
    elif "n" not in vals:
        vals["n"] = vals["c"] / (k * vals["d"])
        notes.append(f"N = C / ({k:g} D) (no N column)")
    elif flops_per_param is None:
        ratio = vals["c"] / (vals["n"] * vals["d"])
        k = float(np.median(ratio))
        notes.append(f"C / (N D) ranges {ratio.min():.4g}..{ratio.max():.4g}; allocation uses the median {k:.4g}")
    if columns.label and columns.label not in header:
        raise TableError(f"{p}: no column {columns.label!r}; the columns are: {', '.join(header)}")
    label = columns.label or ("run" if "run" in header else None)
    labels = [r[label] if label else f"row {i + 2}" for i, r in enumerate(rows)]
    groups = _groups(rows, columns.group, p, header) if columns.group else []
    return Table(vals["n"], vals["d"], vals["c"], loss, labels, columns, k, notes, groups)


def varies(path: str | Path, column: str) -> bool:
    """Whether the CSV has ``column`` with two or more distinct values (e.g. runs of several objectives)."""
    p = Path(path)
    if not p.is_file():
        return False
    rows = files.read_csv(p, "table")
    return bool(rows) and column in rows[0] and len({(r.get(column) or "").strip() for r in rows}) > 1


def _error(rows: list[dict[str, str]], name: str, path: Path, header: list[str]) -> np.ndarray:
    """1 - top-1 of a top-1 column; refuses a missing column, empty cells and a top-1 outside [0, 1)."""
    if name not in header:
        raise TableError(
            f"{path}: no column {name!r} (probe top-1 columns come from `aimpre scaling collect --probe "
            f"TRAIN[,TEST]`); the columns are: {', '.join(header)}"
        )
    out = np.empty(len(rows))
    for i, r in enumerate(rows):
        text = (r.get(name) or "").strip()
        if not text:
            raise TableError(f"{path}: column {name!r}, row {i + 2} is empty (was this run probed? collect --probe)")
        try:
            v = float(text)
        except ValueError:
            raise TableError(f"{path}: column {name!r}, row {i + 2}: {text!r} is not a number") from None
        if not 0 <= v < 1:  # an error of 0 has no logarithm: a power law in log space cannot pass through it
            raise TableError(f"{path}: column {name!r}, row {i + 2}: top-1 {text} must lie in [0, 1) (a fraction "
                             "below 1: an error of 0 cannot be fitted in log space)")  # fmt: skip
        out[i] = 1.0 - v
    return out


def _groups(rows: list[dict[str, str]], name: str, path: Path, header: list[str]) -> list[str]:
    if name not in header:
        raise TableError(f"{path}: no column {name!r} to group by; the columns are: {', '.join(header)}")
    out = [(r.get(name) or "").strip() for r in rows]
    if "" in out:
        raise TableError(f"{path}: column {name!r}, row {out.index('') + 2} is empty: every row needs a group")
    return out


def require(table: Table, form: str, min_points: int, min_n: int = 1, min_d: int = 1) -> None:
    """Raises ``TableError`` unless the table has enough points and distinct sizes / data amounts for ``form``."""
    if len(table) < min_points:
        raise TableError(f"--form {form} needs at least {min_points} rows, the table has {len(table)}")
    for key, need in (("n", min_n), ("d", min_d)):
        distinct = len(np.unique(np.round(np.log(getattr(table, key)), 6)))
        if distinct < need:
            name = getattr(table.columns, key) or key.upper()
            what = "model size" if key == "n" else "data amount"
            raise TableError(
                f"--form {form} needs at least {need} distinct values of {key.upper()} (column {name!r}); the table "
                f"has {distinct} ({'one ' + what + ' only' if distinct == 1 else 'too few'})"
            )


def drop_highest(table: Table, k: int) -> Table:
    """The table without its k rows of highest loss (Epoch AI drop 5 of Chinchilla's 245 points)."""
    if not 0 <= k < len(table):
        raise TableError(f"cannot drop the {k} highest-loss rows of a {len(table)}-row table")
    return table.subset(np.sort(np.argsort(table.loss, kind="stable")[: len(table) - k]))
