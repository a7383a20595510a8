"""Gathering finished runs into one table (CSV): one row per run, what the fits and plots read.

Per run: its ``summary.json`` (steps, samples, FLOPs, final training losses, wall time), its resolved
``config.yaml`` (shape, schedule; parameter counts under every convention of ``aimpre.scaling.flops``, checked
against the counts the run itself recorded) and its ``metrics.csv`` (the validation losses *at the last step*:
a run whose last validation came earlier gets empty ``val_*`` cells rather than a stale value).

With a ``Probe``, each run's encoder is also probed (``aimpre.probe.run_probe``, attentive and linear) for the
``probe_*_top1`` columns that downstream scaling fits read (Cherti et al. 2023 fit error = 1 - top-1). The result
is kept in the run folder as ``probe-<digest>.json``, keyed by the probe data, kinds and settings and the run's
final step, so collecting again reuses it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aimpre import files
from aimpre.config import ConfigError, load_config
from aimpre.scaling.flops import param_counts
from aimpre.scaling.sweep import load_plan

COLUMNS = (
    "run", "size", "kind", "objective", "params", "params_encoder", "params_decoder", "params_heads", "params_total",
    "params_encoder_nonemb", "params_total_nonemb", "params_encoder_active", "params_active",
    "flops_per_sample", "steps", "samples", "flops",
    "loss", "loss_image", "loss_text", "val_loss", "val_loss_image", "val_loss_text", "width", "depth", "heads",
    "mlp_hidden", "img_size", "patch_size", "num_patches", "dec_width", "dec_depth", "lr", "schedule",
    "cooldown_steps", "batch_size", "wall_time_s",
    "probe_attentive_top1", "probe_linear_top1",
)  # fmt: skip
# *_active: MoE blocks counted with the top-k experts a token uses (equal to the plain counts for dense models)
PARAMS = ("encoder", "total", "encoder_nonemb", "total_nonemb", "encoder_active", "active")


@dataclass(frozen=True)
class Probe:
    """What ``collect`` probes each run on: labelled shards (``demo:SPLIT`` or a shard spec; ``test`` None holds
    out 20% of ``train``) and the probe settings (``aimpre.probe.ProbeSettings`` fields, e.g. {"epochs": 10})."""

    train: str
    test: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def parse_probe(text: str) -> Probe:
    """``TRAIN[,TEST]`` -> ``Probe`` (a comma inside braces belongs to a shard spec such as ``a-{0,1}.tar``)."""
    depth, cut = 0, None
    for i, ch in enumerate(text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            if cut is not None:
                raise ValueError(f"--probe takes TRAIN[,TEST], got {text!r}: more than one comma outside braces")
            cut = i
    train, test = (text, None) if cut is None else (text[:cut], text[cut + 1 :])
    if not train.strip() or (test is not None and not test.strip()):
        raise ValueError(f"--probe takes TRAIN[,TEST] (two shard specs or demo:SPLIT names), got {text!r}")
    return Probe(train.strip(), None if test is None else test.strip())


def probe_row(run: Path, probe: Probe, steps: int, random_init: bool = False) -> tuple[dict[str, float], bool]:
    """The run's probe top-1 columns, and whether they came from the run's cached ``probe-<digest>.json``.

    ``random_init``: the columns of the run's architecture at its random initialisation instead (``run_probe``'s
    ``compare_random``), the floor its pretraining has to beat.
    """
    from aimpre.probe import KINDS, ProbeError, ProbeSettings, run_probe

    settings = ProbeSettings(**probe.settings)
    key = {"train": probe.train, "test": probe.test, "kinds": list(KINDS), "settings": asdict(settings),
           "step": steps, **({"random_init": True} if random_init else {})}  # fmt: skip
    out = run / f"probe-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"
    which = "random_init" if random_init else "encoder"

    def columns(res: dict) -> dict[str, float]:
        found = res["results"][which]
        # the train top-1 beside (not a results.csv column; aimpre compare reports it)
        return {
            **{f"probe_{k}_top1": float(found[k]["top1"]) for k in KINDS},
            **{f"probe_{k}_train_top1": float(found[k]["train_top1"]) for k in KINDS if "train_top1" in found[k]},
        }

    if out.exists() or out.is_symlink():
        try:  # bounded, and a FIFO is refused rather than waited on
            return columns(files.read_json_object(out, "probe result")), True
        except (ValueError, TypeError, KeyError):  # unreadable or not ours (written by hand?): probe again, replace it
            pass
    try:
        res = run_probe(run, probe.train, probe.test, KINDS, settings, compare_random=random_init, out=out)
    except ProbeError as e:
        raise ProbeError(f"run {run}: probe: {e}") from None
    return columns(res), False


def finished(run: Path) -> bool:
    """Whether a run folder holds a finished run: ``summary.json`` and no ``PREEMPTED`` marker (older versions
    wrote a summary for a run a signal had stopped early too: such a run is unfinished and resumes)."""
    return files.file_present(run / "summary.json", "run summary") and not (run / "PREEMPTED").exists()


def _final_val(run: Path, steps: int) -> dict[str, Any]:
    rows = [r for r in files.read_csv(run / "metrics.csv", "metrics file") if r.get("val_loss")]
    last = rows[-1] if rows else None
    try:
        if last is None or int(last["step"]) != steps:
            return {}
        # the losses this objective has
        return {k: float(last[k]) for k in ("val_loss", "val_loss_image", "val_loss_text") if last.get(k)}
    except (TypeError, ValueError) as e:  # a step or loss that is not a number: name the file
        raise ValueError(f"metrics file {run / 'metrics.csv'}: its last validation row does not parse ({e})") from None


def run_row(run: Path, params: str = "total", size: str | None = None, kind: str = "run") -> dict[str, Any]:
    """The table row of one finished run folder.

    Args:
        run: a run folder with summary.json, config.yaml and metrics.csv.
        params: which count fills the ``params`` column: one of ``PARAMS``.
        size: the sweep's size name (default: the config's ``model.size``).
        kind: run | trunk | branch.
    """
    if params not in PARAMS:
        raise ValueError(f"params must be one of {PARAMS}, got {params!r}")
    summary = files.read_json_object(run / "summary.json", "run summary")
    try:
        cfg = load_config(run / "config.yaml")
    except ConfigError as e:
        raise ConfigError(f"run {run}: its config.yaml no longer loads: {e}") from e
    m, o = cfg.model, cfg.optim
    counts = param_counts(m)
    bare = param_counts(m, embeddings=False)
    active = param_counts(m, active=True)
    recorded = summary.get("params", {})
    if recorded and recorded.get("total") != counts["total"]:
        raise ValueError(f"run {run}: summary.json records {recorded.get('total')} parameters, its config gives "
                         f"{counts['total']}: the run and this code disagree on the model")  # fmt: skip
    row: dict[str, Any] = {
        "run": run.name, "size": size or m.size, "kind": kind, "objective": m.objective,
        **{f"params_{k}": v for k, v in counts.items()},
        "params_encoder_nonemb": bare["encoder"], "params_total_nonemb": bare["total"],
        "params_encoder_active": active["encoder"], "params_active": active["total"],
        "flops_per_sample": summary["flops_per_sample"], "steps": summary["steps"], "samples": summary["samples"],
        "flops": summary["flops"], **summary.get("final", {}), **_final_val(run, summary["steps"]),
        "width": m.width, "depth": m.depth, "heads": m.heads, "mlp_hidden": m.mlp_hidden,
        # the resolution: FLOPs per sample grow with num_patches, so runs at 224 and 336 px are not one curve
        "img_size": m.img_size, "patch_size": m.patch_size, "num_patches": m.num_patches,
        "dec_width": m.dec_width, "dec_depth": m.dec_depth, "lr": o.lr,
        "schedule": "cooldown" if o.cooldown_steps else o.schedule, "cooldown_steps": o.cooldown_steps,
        "batch_size": cfg.data.batch_size, "wall_time_s": summary.get("wall_time_s"),
    }  # fmt: skip
    row["params"] = row[f"params_{params}"]
    return row


def collect(
    path: str | Path,
    params: str = "total",
    include_trunks: bool = False,
    probe: Probe | None = None,
    progress: Callable[[str, int, int, bool], None] | None = None,
) -> tuple[list[dict], list[str]]:
    """Rows of every finished run under ``path``, and the names of unfinished ones.

    Args:
        path: a plan folder (with plan.json: its points, in plan order; trunks left out unless
            ``include_trunks``, as they are not cooled down) or any folder holding run folders.
        params: as ``run_row``.
        include_trunks: keep the constant-lr trunks of a cooldown sweep.
        probe: also probe each finished run (``probe_row``) for the ``probe_*_top1`` columns.
        progress: called after each run is probed with (run name, done, total, whether it was cached).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"runs folder not found: {root}")
    found, missing = [], []  # (run folder, size, kind) of the finished runs
    if (root / "plan.json").is_file():
        plan = load_plan(root)
        for p in plan["points"]:
            if p["kind"] == "trunk" and not include_trunks:
                continue
            run = root / plan.get("runs_dir", "runs") / p["name"]
            if finished(run):
                found.append((run, p["size"], p["kind"]))
            else:
                missing.append(p["name"])
    else:
        for s in sorted(root.rglob("summary.json")):
            if finished(s.parent):
                found.append((s.parent, None, "run"))
            else:
                missing.append(s.parent.name)
    if not found:
        raise FileNotFoundError(f"no finished runs (summary.json) under {root}")
    rows = [run_row(run, params, size, kind) for run, size, kind in found]  # every config checked before probing
    if probe is not None:
        for i, ((run, _, _), row) in enumerate(zip(found, rows, strict=True)):
            top1, cached = probe_row(run, probe, row["steps"])
            row.update(top1)
            if progress:
                progress(run.name, i + 1, len(found), cached)
    return rows, missing


def write_csv(rows: list[dict[str, Any]], out: str | Path) -> None:
    """Writes the table atomically (temp file, then rename)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    files.write_text(out, buf.getvalue())
