"""The ``aimpre`` command: parses arguments and calls the library. No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from aimpre import __version__


def _train(args: argparse.Namespace) -> int:
    from aimpre.config import load_config
    from aimpre.train import train

    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, resume=args.resume)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"\nrun directory: {run_dir}")
    base = summary.get("baselines", {})
    rows = [
        ("loss_image", "loss_image_mean_patch", "mean patch"),
        ("loss_text", "loss_text_bigram", "bigram"),
        ("loss", None, ""),
    ]
    print(f"{'':12}{'step 1':>10}{'final':>10}{'val':>10}{'baseline (val)':>22}")
    for key, bkey, bname in rows:
        vals = [summary.get(part, {}).get(key) for part in ("initial", "final", "val")]
        cells = "".join(f"{v:>10.4f}" if v is not None else f"{'-':>10}" for v in vals)
        b = f"{base[bkey]:.4f} ({bname})" if bkey and bkey in base else ""
        print(f"{key:12}{cells}{b:>22}")
    return 0


def _data_demo(args: argparse.Namespace) -> int:
    from aimpre.data import write_demo

    out = write_demo(Path(args.out))
    index = json.loads((out / "index.json").read_text())
    for split, info in index["splits"].items():
        print(f"{split:14} {info['samples']:6d} samples in {len(info['shards'])} shard(s)")
    print(f"written to {out}")
    return 0


def _model_info(args: argparse.Namespace) -> int:
    import torch

    from aimpre.config import load_config
    from aimpre.data import build_tokenizer
    from aimpre.model import SIZES, AIMv2
    from aimpre.scaling import training_flops
    from aimpre.train import resolve

    if args.name in SIZES:
        cfg = load_config(None, [f"model.size={args.name}", "run.name=info"])
    else:
        cfg = load_config(args.name, ["run.name=info"])
    cfg = resolve(cfg, build_tokenizer(cfg.data.tokenizer, cfg.data.lowercase))
    with torch.device("meta"):
        model = AIMv2(cfg.model)
    info: dict = {**model.param_counts(), "flops_per_sample": training_flops(cfg.model).total}
    if args.json:
        print(json.dumps(info))
    else:
        m = cfg.model
        print(f"{m.size}: {m.img_size}px patch {m.patch_size}, encoder {m.depth}x{m.width} ({m.heads} heads)")
        for k in ("encoder", "decoder", "heads", "total"):
            print(f"  {k:10} {info[k] / 1e6:10.1f}M params")
        print(f"  training FLOPs per sample: {info['flops_per_sample'] / 1e9:.1f} GFLOP")
    return 0


def _columns(args: argparse.Namespace, default: dict | None = None) -> Any:
    """The table's column names: the ones given, else the fit's (plot), else collect's."""
    from aimpre.scaling.table import Columns

    base = default or {"n": "params", "d": "samples", "c": "flops", "loss": "val_loss"}
    given = any(getattr(args, k) for k in ("n", "d", "c"))
    ndc = {k: getattr(args, k) if given else base.get(k) for k in ("n", "d", "c")}
    return Columns(**ndc, loss=args.loss or base.get("loss") or "val_loss", label=args.label or base.get("label"))


def _scaling_plan(args: argparse.Namespace) -> int:
    from aimpre.scaling.sweep import format_plan, load_sweep, plan

    sweep, root = load_sweep(args.sweep)
    print(format_plan(plan(sweep, root, args.out)))
    print(f"configs and plan.json in {args.out}")
    return 0


def _scaling_run(args: argparse.Namespace) -> int:
    from aimpre.scaling import files, runner

    if args.slurm or args.commands:
        for path, text in ((args.slurm, runner.slurm_script(args.plan, args.launcher, tuple(args.sbatch))),
                           (args.commands, runner.command_list(args.plan, args.launcher))):  # fmt: skip
            if path:
                files.write_text(path, text)
                print(f"wrote {path}")
        return 0
    from tqdm import tqdm

    bar = tqdm(total=None, desc="sweep", unit="run")

    def report(out: runner.Outcome, done: int, total: int) -> None:
        bar.total = total
        bar.update(1)
        bar.write(f"[{done}/{total}] {out.name}: {out.status}" + (f" in {out.seconds:.0f} s" if out.seconds else "")
                  + (f" (log: {out.log})" if out.status == "failed" and out.log else ""))  # fmt: skip

    try:
        results = runner.run_plan(args.plan, args.jobs, args.launcher, args.threads, args.group, report)
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: the same command resumes (finished runs are skipped, the others continue)")
        return 130
    bar.close()
    failed = [r.name for r in results if r.status == "failed"]
    tail = f"; failed: {', '.join(failed)}" if failed else ""
    print(f"{len(results) - len(failed)} of {len(results)} runs finished{tail}")
    return 1 if failed else 0


def _scaling_collect(args: argparse.Namespace) -> int:
    from aimpre.scaling.collect import collect, write_csv

    rows, missing = collect(args.runs, args.params, args.include_trunks)
    out = args.out or str(Path(args.runs) / "results.csv")
    write_csv(rows, out)
    print(f"{len(rows)} runs -> {out}" + (f"; not finished: {', '.join(missing)}" if missing else ""))
    return 0


def _scaling_fit(args: argparse.Namespace) -> int:
    from aimpre.scaling import report
    from aimpre.scaling.table import drop_highest, read_table

    table = read_table(args.table, _columns(args), args.flops_per_param)
    if args.bench:
        from aimpre.scaling.bench import bench_fit

        print(bench_fit(drop_highest(table, args.drop_highest), args.scipy_every, args.numeric))
        return 0
    res = report.fit_table(
        table, args.form, args.objective, args.bootstrap, args.seed, args.ci, not args.no_e, args.budgets,
        args.tol, args.holdout, args.drop_highest,
    )  # fmt: skip
    print(report.format_fit(res))
    if args.json:
        report.write_json(res, args.json)
        print(f"wrote {args.json}")
    return 0


def _scaling_predict(args: argparse.Namespace) -> int:
    from aimpre.scaling import report

    res = report.read_json(args.fit)
    pred = report.predict(res, args.flops, args.n_params, args.d_samples)
    print(json.dumps(pred) if args.json else report.format_prediction(pred))
    return 0


def _scaling_plot(args: argparse.Namespace) -> int:
    from aimpre.scaling import report
    from aimpre.scaling.plots import plot_scaling
    from aimpre.scaling.table import read_table

    fit = report.read_json(args.fit) if args.fit else None
    k = args.flops_per_param if args.flops_per_param else (fit.flops_per_param if fit else None)
    table = read_table(args.table, _columns(args, fit.columns if fit else None), k)
    print(f"wrote {plot_scaling(table, fit, args.out, args.budgets, args.tol, args.extrapolate, args.title)}")
    return 0


def _add_scaling(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("scaling", help="scaling laws: plan and run sweeps, collect, fit, predict, plot")
    ssub = s.add_subparsers(dest="scaling_command", required=True)
    pl = ssub.add_parser("plan", help="expand a sweep YAML into run configs and plan.json")
    pl.add_argument("sweep", help="sweep YAML (e.g. configs/sweeps/tiny_cpu.yaml)")
    pl.add_argument("--out", required=True, help="plan folder to write (runs go to OUT/runs)")
    pl.set_defaults(fn=_scaling_plan)

    r = ssub.add_parser("run", help="train a plan's points (finished ones are skipped), or write cluster scripts")
    r.add_argument("plan", help="plan folder")
    r.add_argument("--jobs", type=int, default=1, help="groups (a trunk and its branches, or one run) at a time")
    r.add_argument("--threads", type=int, help="OMP threads per run (e.g. 1 with --jobs 2 on 2 cores)")
    r.add_argument("--launcher", help="replaces python in each training command, e.g. 'torchrun --nproc_per_node 8'")
    r.add_argument("--group", help="run only this group (what a SLURM array task does)")
    r.add_argument("--slurm", help="write a SLURM array script here instead of running")
    r.add_argument("--sbatch", action="append", default=[], help="extra #SBATCH option (repeatable)")
    r.add_argument("--commands", help="write one shell command per group here instead of running")
    r.set_defaults(fn=_scaling_run)

    c = ssub.add_parser("collect", help="gather finished runs into one CSV")
    c.add_argument("runs", help="a plan folder or any folder of run folders")
    c.add_argument("--out", help="CSV to write (default RUNS/results.csv)")
    c.add_argument("--params", default="total", help="the 'params' column: total|encoder|total_nonemb|encoder_nonemb")
    c.add_argument("--include-trunks", action="store_true", help="keep the constant-lr trunks of a cooldown sweep")
    c.set_defaults(fn=_scaling_collect)

    def columns(q: argparse.ArgumentParser) -> None:
        q.add_argument("table", help="results CSV")
        q.add_argument("--n", help="parameters column (default 'params'; naming any of --n/--d/--c uses only those)")
        q.add_argument("--d", help="samples/tokens column (default 'samples'; without it D = C / (k N))")
        q.add_argument("--c", help="training FLOPs column (default 'flops')")
        q.add_argument("--loss", help="loss column (default 'val_loss')")
        q.add_argument("--label", help="column naming each run (default 'run' when present)")
        q.add_argument("--flops-per-param", type=float, help="k in C = k N D (default 6 when a column is derived)")
        q.add_argument("--budgets", type=float, nargs="+", help="iso-FLOP budgets (default: grouped by --tol)")
        q.add_argument("--tol", type=float, default=0.15, help="iso-FLOP budget tolerance, relative (0.15)")

    f = ssub.add_parser("fit", help="fit a scaling law to a results table")
    columns(f)
    f.add_argument("--form", default="chinchilla", choices=("chinchilla", "power", "isoflop"))
    f.add_argument("--objective", default="huber", choices=("huber", "likelihood", "squares"))
    f.add_argument("--no-e", action="store_true", help="power form without the irreducible loss E")
    f.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for the intervals")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--ci", type=float, default=95.0, help="interval coverage in percent")
    f.add_argument("--holdout", type=int, default=0, help="leave out the K runs of largest compute and predict them")
    f.add_argument("--drop-highest", type=int, default=0, help="drop the K runs of highest loss (Epoch: 5)")
    f.add_argument("--json", help="write the fit here")
    f.add_argument("--bench", action="store_true", help="time the batched fit against a scipy loop instead")
    f.add_argument("--scipy-every", type=int, default=1, help="bench: the loop runs every k-th start")
    f.add_argument("--numeric", action="store_true", help="bench: the loop uses numerical gradients")
    f.set_defaults(fn=_scaling_fit)

    pr = ssub.add_parser("predict", help="compute-optimal N*, D* and loss at a budget, or the loss of (N, D)")
    pr.add_argument("fit", help="a fit JSON (aimpre scaling fit --json)")
    pr.add_argument("--flops", type=float, help="compute budget C")
    pr.add_argument("--n-params", type=float, help="parameters N (with --d-samples)")
    pr.add_argument("--d-samples", type=float, help="samples/tokens D (with --n-params)")
    pr.add_argument("--json", action="store_true", help="print JSON")
    pr.set_defaults(fn=_scaling_predict)

    pt = ssub.add_parser("plot", help="the four-panel scaling figure (PNG)")
    columns(pt)
    pt.add_argument("--fit", help="a Chinchilla-form or power fit JSON (its columns are the default)")
    pt.add_argument("--out", required=True, help="PNG to write")
    pt.add_argument("--extrapolate", type=float, default=100.0, help="extend panels (c), (d) by this factor in C")
    pt.add_argument("--title")
    pt.set_defaults(fn=_scaling_plot)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aimpre", description="Pretrain vision encoders the AIMv2 way.")
    p.add_argument("--version", action="version", version=f"aimpre {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="pretrain (default: tiny AIMv2 on the embedded demo data, CPU, minutes)")
    t.add_argument("--config", help="YAML config (differences from the defaults)")
    t.add_argument("--resume", action="store_true", help="continue run.name from its last checkpoint, if any")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=3e-4 model.depth=12")
    t.set_defaults(fn=_train)

    d = sub.add_parser("data", help="write and inspect shards")
    dsub = d.add_subparsers(dest="data_command", required=True)
    demo = dsub.add_parser("demo", help="write the embedded demo data set as webdataset shards")
    demo.add_argument("--out", required=True, help="directory to create")
    demo.set_defaults(fn=_data_demo)

    mi = sub.add_parser("model-info", help="parameter counts and training FLOPs of a size or config")
    mi.add_argument("name", help="a size (tiny, large, huge, 1b, 3b) or a YAML config file")
    mi.add_argument("--json", action="store_true", help="print one JSON object")
    mi.set_defaults(fn=_model_info)
    _add_scaling(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from aimpre.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"aimpre: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
