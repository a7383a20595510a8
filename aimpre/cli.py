"""The ``aimpre`` command: parses arguments and calls the library. No logic of its own."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from aimpre import __version__
from aimpre.files import file_present, read_json_object, read_text


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the same shape as every other ``aimpre`` error) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checked(kind: type, ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse ``type`` that parses ``kind`` and refuses values outside ``ok``, e.g. ``--batch-size -1``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text[:40]!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text[:40]}")
        return value

    return parse


INT_GT0 = _checked(int, lambda v: v > 0, "a positive integer")
COUNT = _checked(int, lambda v: v >= 0, "an integer >= 0")
FLOAT_GT0 = _checked(float, lambda v: v > 0, "a positive number")
PERCENT = _checked(float, lambda v: 0 < v < 100, "a percentage in (0, 100)")
FACTOR = _checked(float, lambda v: v >= 1, "a factor >= 1")
INT_GE2 = _checked(int, lambda v: v >= 2, "an integer >= 2")
# bench step's builds (aimpre.bench.step.BUILDS), the float8 recipes (aimpre.config.FP8_RECIPES) and the objectives,
# here so that parsing the command line (and so `--help`) imports no torch: importing aimpre.model takes seconds
BENCH_BUILDS = ("plain", "bf16", "fp8", "moe")
FP8_RECIPES = ("tensorwise", "rowwise")
OBJECTIVES = ("aimv2", "aimv1", "siglip", "clip", "classification", "distill", "aimv2_distill")  # model.sizes'
COMPARE_ROWS = (*OBJECTIVES, "aimv2-moe")  # aimpre.compare.ROWS
COMPARE_TASKS = ("digits", "zero-shot", "attributes", "localize", "vlm")  # aimpre.compare_tasks.TASKS
COMPARE_DEFAULT = OBJECTIVES[:5]  # the distilled rows need --teacher


def _builds(text: str) -> list[str]:
    """``--builds plain,fp8``: a non-empty subset of BENCH_BUILDS."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in BENCH_BUILDS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"must name some of {','.join(BENCH_BUILDS)}, got {text[:40]!r}")
    return names


# what ``scaling fit/plot --y`` may name: the loss column, or the error 1 - top-1 of a probe (or any) top-1 column
Y_ERRORS = {"error_attentive": "probe_attentive_top1", "error_linear": "probe_linear_top1"}


def _y(text: str) -> str | None:
    """``--y``: None for the loss, else the top-1 column whose error is fitted."""
    if text == "loss":
        return None
    if text in Y_ERRORS:
        return Y_ERRORS[text]
    if text.startswith("error:") and text[6:]:
        return text[6:]
    raise argparse.ArgumentTypeError(f"must be loss, {', '.join(Y_ERRORS)} or error:COLUMN, got {text[:40]!r}")


def _y_arg(text: str) -> str:
    _y(text)  # refuses a value it cannot read, as argparse's one-line error naming --y
    return text


def _train(args: argparse.Namespace) -> int:
    from aimpre.signals import StopSignals  # no torch: installed before the heavy imports in _train_run

    # a stop signal after train() has returned must not kill the process either: the marker (or the summary) says
    # how the run ended, and the exit status must say the same
    with StopSignals().installed():
        return _train_run(args)


def _train_run(args: argparse.Namespace) -> int:
    from lightning.pytorch.utilities import rank_zero_only

    from aimpre.config import load_config, validate
    from aimpre.train import train
    from aimpre.train.checkpoint import EXIT_PREEMPTED, PREEMPTED

    cfg = load_config(args.config, args.overrides)
    if args.init is not None:  # the flag is run.init; set here, not as an override, so no path is parsed as YAML
        cfg = replace(cfg, run=replace(cfg.run, init=args.init))
        validate(cfg)
    run_dir = train(cfg, resume=args.resume)
    stopped = run_dir / PREEMPTED
    if getattr(rank_zero_only, "rank", 0) != 0:  # the global rank Lightning set under any launcher (torchrun, srun)
        return EXIT_PREEMPTED if stopped.exists() else 0  # every rank: srun's status is its tasks' highest
    if stopped.exists():  # a signal stopped it early: not finished, no summary; the sbatch script requeues on 75
        at = " ".join(read_text(stopped, "PREEMPTED marker", 4096).split())  # our marker: bounded, one line
        print(f"\naimpre: run {run_dir.name} stopped at {at} before trainer.max_steps, with a checkpoint; "
              f"not finished: resume with `aimpre train --resume` and the same config ({run_dir})")  # fmt: skip
        return EXIT_PREEMPTED
    summary = read_json_object(run_dir / "summary.json", "run summary")
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
        if all(v is None for v in vals):  # a part this objective has not got (e.g. loss_text of aimv1)
            continue
        cells = "".join(f"{v:>10.4f}" if v is not None else f"{'-':>10}" for v in vals)
        b = f"{base[bkey]:.4f} ({bname})" if bkey and bkey in base else ""
        print(f"{key:12}{cells}{b:>22}")
    return 0


def _data_demo(args: argparse.Namespace) -> int:
    from aimpre.data import write_demo

    out = write_demo(Path(args.out))
    index = read_json_object(out / "index.json", "shard index")
    for split, info in index["splits"].items():
        print(f"{split:14} {info['samples']:6d} samples in {len(info['shards'])} shard(s)")
    print(f"written to {out}")
    return 0


def _make_shards(args: argparse.Namespace) -> int:
    from aimpre.data import make_shards as ms

    if args.from_folder:
        items = ms.from_folder(Path(args.from_folder))
    elif args.from_csv:
        items = ms.from_csv(Path(args.from_csv), args.path_col, args.caption_col)
    else:
        items = ms.from_shards(args.from_shards)
    s = ms.make_shards(items, Path(args.out), args.per_shard, args.max_side, args.prefix)
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(s.skipped.items())) or "none"
    print(f"wrote {s.written} samples in {len(s.shards)} shard(s) to {args.out}; skipped {skipped}")
    for reason, names in sorted(s.skipped_files.items()):
        n = s.skipped[reason]
        more = f" and {n - 5} more (the first {len(names)} in index.json)" if n > 5 else ""
        print(f"  {reason}: {', '.join(names[:5])}{more}")
    return 0


def _data_index(args: argparse.Namespace) -> int:
    from aimpre.data.reader import index_shards
    from aimpre.data.shardset import read_index

    for path in index_shards(args.shards, Path(args.out) if args.out else None):
        counts = read_index(path)
        print(f"{path}: {len(counts)} shards, {sum(counts.values())} samples")
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from aimpre.config import load_config
    from aimpre.data import Augment, build_tokenizer, sources
    from aimpre.data.scan import inspect_shards

    cfg = load_config(args.config, args.overrides)
    d, m = cfg.data, cfg.model
    aug = Augment(m.img_size, scale=d.crop_scale, hflip=d.hflip, max_pixels=d.max_pixels, max_bytes=d.max_sample_bytes)
    tok = build_tokenizer(d.tokenizer, d.lowercase)
    shards = sources(args.shards, "pretrain", need_counts=False, index=None)[0]
    report = inspect_shards(shards, aug, tok, m.text_len, args.workers)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"read {report['read']}, kept {report['kept']} from {report['shards']} shard(s)")
        for reason, n in sorted(report["skipped"].items()):
            print(f"  skipped {reason:14} {n}")
        for kind, n in sorted(report["errors"].items()):
            print(f"  read error {kind:17} {n}")
        for d in report["damage"]:
            if d["offset"] is None:  # not at a place in the stream (a stale index)
                print(f"  damaged: {d['shard']}: {d['reason']}: {d['error']}")
                continue
            after = f"resumed at byte {d['resumed']}" if d["resumed"] is not None else "nothing readable after it"
            print(f"  damaged: {d['shard']}: {d['reason']} at byte {d['offset']}, {after}")
        print(f"  captions cut at {m.text_len} tokens: {report['truncated_captions']}")
    if report["kept"] == 0:  # a data set that yields nothing must not pass a vetting step in a script
        print(f"aimpre: error: no usable sample in {args.shards}", file=sys.stderr)
        return 1
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from aimpre.data import sources
    from aimpre.data.scan import iter_captions
    from aimpre.data.tokenizer import build_tokenizer, train_bpe

    captions = iter_captions(sources(args.shards, "pretrain", need_counts=False, index=None)[0], args.max_samples)
    out = train_bpe(captions, args.vocab_size, Path(args.out), lowercase=not args.keep_case)
    tok = build_tokenizer(str(out), lowercase=not args.keep_case)
    print(f"wrote {out}: vocabulary {tok.vocab_size}, pad id {tok.pad_id}, end-of-text id {tok.eos_id}")
    return 0


def _bench_loader(args: argparse.Namespace) -> int:
    import platform
    import tempfile

    import torch

    from aimpre.bench.loader import bench_loader, synthetic_shards

    spec = args.shards
    with tempfile.TemporaryDirectory() as tmp:
        if spec is None:
            print(f"writing {args.synthetic} synthetic 512x384 JPEGs ...", flush=True)
            spec = synthetic_shards(Path(tmp), args.synthetic)
        rows = bench_loader(spec, args.workers, args.batch, args.batches, rounds=args.rounds)
    cpu = platform.processor() or platform.machine()
    print(f"loader throughput, {args.workers} worker(s), batch {args.batch}, {cpu}, torch {torch.__version__}")
    print(f"median of {args.rounds} alternating rounds (slowest-fastest round in brackets); per CPU-s: images per")
    print("CPU-second of the main process and its workers together, i.e. per core busy")
    head = f"{'img/s':>9}{'per worker':>12}{'vs plain':>10}{'rounds':>13}{'per CPU-s':>11}{'vs plain':>10}"
    print(f"{'pipeline':42}{head}")
    for r in rows:
        spread = f"[{r['low']:.0f}-{r['high']:.0f}]"
        cpu = "-" if r["img_per_cpu_s"] is None else f"{r['img_per_cpu_s']:.1f}"
        cpu_vs = "-" if r["cpu_vs_plain"] is None else f"{r['cpu_vs_plain']:.2f}x"
        print(f"{r['pipeline']:42}{r['img_per_s']:>9.1f}{r['per_worker']:>12.1f}{r['vs_plain']:>9.2f}x"
              f"{spread:>13}{cpu:>11}{cpu_vs:>10}")  # fmt: skip
    return 0


def _launch(args: argparse.Namespace) -> int:
    from aimpre.train.launch import sbatch_script, torchrun_commands

    overrides = tuple(args.overrides)
    if args.target == "slurm":
        print(sbatch_script(args.config, args.name, args.nodes, args.gpus_per_node, args.time, args.cpus,
                            args.out_dir, args.python, overrides, tuple(args.sbatch)), end="")  # fmt: skip
    else:
        print(torchrun_commands(args.config, args.name, args.gpus_per_node, args.nodes, args.rdzv_endpoint,
                                args.max_restarts, args.out_dir, overrides))  # fmt: skip
    return 0


def _bench_size(size: str, command: str) -> None:
    """Refuses a --size that is not a model size, naming the bench command."""
    from aimpre.model import SIZES

    if size not in SIZES:
        raise ValueError(f"bench {command} --size: unknown size {size!r}; known sizes: {', '.join(SIZES)}")


def _bench_step(args: argparse.Namespace) -> int:
    import torch

    from aimpre.bench.step import StepSettings, run_step

    _bench_size(args.size, "step")
    if not args.quick and not torch.cuda.is_available():
        print("no GPU: running the CPU smoke version (--quick); the targets are judged on a GPU", file=sys.stderr)
    s = StepSettings(args.size, args.batch, args.steps, args.warmup, args.backend, args.quick, args.recipe)
    run_step(s, tuple(args.builds), args.out)
    return 0


def _bench_fp8(args: argparse.Namespace) -> int:
    import torch

    from aimpre.bench.fp8 import Fp8Settings, run_fp8

    _bench_size(args.size, "fp8")
    if not args.quick and not torch.cuda.is_available():
        print("no GPU: running the CPU smoke version (--quick); the target is judged on a GPU", file=sys.stderr)
    s = Fp8Settings(args.size, args.steps, args.batch, args.log_every, args.recipe, args.quick)
    run_fp8(s, args.out, args.plot)
    return 0


def _model_info(args: argparse.Namespace) -> int:
    import torch

    from aimpre.config import load_config
    from aimpre.data import build_tokenizer
    from aimpre.model import SIZES
    from aimpre.objectives import build
    from aimpre.scaling import training_flops
    from aimpre.train import resolve

    at = [f"model.img_size={args.img_size}"] if args.img_size else []  # FLOPs per sample at any resolution
    if args.name in SIZES:
        cfg = load_config(None, [f"model.size={args.name}", "run.name=info", *at])
    elif file_present(args.name, "config file"):
        cfg = load_config(args.name, ["run.name=info", *at])
    else:
        raise ValueError(f"{args.name!r} is neither a model size ({', '.join(SIZES)}) nor a config file")
    cfg = resolve(cfg, build_tokenizer(cfg.data.tokenizer, cfg.data.lowercase))
    with torch.device("meta"):
        model = build(cfg.model)
    parts = model.param_counts()  # the parts of model.objective's model: encoder, decoder, heads, text, total
    info: dict = {**parts, "img_size": cfg.model.img_size, "flops_per_sample": training_flops(cfg.model).total}
    # native resolution: T varies per batch, so FLOPs per sample are per area (patches, padding included)
    areas = [args.area] if args.area else []
    if cfg.data.native and not areas:
        lo, hi = cfg.data.native_log2_area
        areas = [1 << n for n in range(lo, hi + 1)]
    if areas:
        info["flops_per_sample_by_area"] = {str(a): training_flops(cfg.model, tokens=a).total for a in areas}
    if cfg.model.moe_experts:  # MoE: what one token uses (the flops are already those of the routed tokens)
        from aimpre.scaling.flops import param_counts

        active = param_counts(cfg.model, active=True)
        info.update(encoder_active=active["encoder"], total_active=active["total"])
    if args.json:
        print(json.dumps(info))
    else:
        m = cfg.model
        print(f"{m.size}: {m.img_size}px patch {m.patch_size}, encoder {m.depth}x{m.width} ({m.heads} heads)")
        print(f"  objective  {m.objective}")
        if m.moe_experts:
            print(f"  MoE        {m.moe_experts} experts, top-{m.moe_top_k}; active = the experts a token uses")
        for k in [*parts, *(("encoder_active", "total_active") if m.moe_experts else ())]:
            print(f"  {k:10} {info[k] / 1e6:10.1f}M params")
        print(
            f"  training FLOPs per sample: {info['flops_per_sample'] / 1e9:.1f} GFLOP"
            + (" (routed tokens: top-k experts)" if m.moe_experts else "")
        )
        for a, f in info.get("flops_per_sample_by_area", {}).items():
            print(
                f"  at {a:>5} patches (native area): {f / 1e9:.1f} GFLOP per sample, {f / int(a) / 1e9:.3f} per token"
            )
    return 0


def _config_show(args: argparse.Namespace) -> int:
    from aimpre.config import describe, load_config

    rows = describe(load_config(args.config, args.overrides))
    key_w = max(len(k) for k, _, _ in rows)
    val_w = min(max(len(v) for _, v, _ in rows), 40)
    for key, value, text in rows:
        print(f"{key:{key_w}}  {value:{val_w}}  {text}".rstrip())
    return 0


def _bench_attention(args: argparse.Namespace) -> int:
    from aimpre.bench.attention import run_attention

    run_attention(quick=args.quick, dtype=args.dtype, reps=args.reps, out=args.out)
    return 0


def _bench_gpu(args: argparse.Namespace) -> int:
    from aimpre.gpucheck import STEPS, run_check

    steps = [s for s in STEPS if s.name in args.steps] if args.steps else STEPS
    report, passed = run_check(args.out, args.budget_s, args.allow_cpu, args.quick, steps)
    print(report)
    print(f"report written to {args.out}", file=sys.stderr)
    return 0 if passed else 1


def _bench_ops(args: argparse.Namespace) -> int:
    import os

    import torch

    from aimpre.bench.ops import run_ops
    from aimpre.model import model_config

    _bench_size(args.size, "ops")
    quick = args.quick or not torch.cuda.is_available()
    if quick:  # tiny shapes: a smoke test of the command (on CPU liger's cross-entropy runs in Triton's interpreter)
        os.environ.setdefault("TRITON_INTERPRET", "1")
        shapes = dict(batch=2, width=64, hidden=128, tokens=16, dec_width=64, dec_hidden=128, dec_tokens=24, text=8,
                      vocab=300)  # fmt: skip
        label = "tiny smoke-test shapes (--quick)"
    else:
        m = model_config(args.size, vocab_size=32000)
        shapes = dict(batch=args.batch, width=m.width, hidden=m.mlp_hidden, tokens=m.num_patches,
                      dec_width=m.dec_width, dec_hidden=m.dec_mlp_hidden, dec_tokens=m.dec_seq_len,
                      text=m.text_len, vocab=32000)  # fmt: skip
        label = f"AIMv2-{args.size} shapes, batch {args.batch}"
    run_ops(shapes, label, quick=quick, reps=args.reps, out=args.out, ops=tuple(args.ops))
    return 0


def _columns(args: argparse.Namespace, default: dict | None = None) -> Any:
    """The table's column names: the ones given, else the fit's (plot), else collect's. The group column: --group
    (``none``: no grouping), else the fit's, else ``objective`` when the table holds several objectives."""
    from aimpre.scaling.table import Columns, varies

    base = default or {"n": "params", "d": "samples", "c": "flops", "loss": "val_loss"}
    given = any(getattr(args, k) for k in ("n", "d", "c"))
    ndc = {k: getattr(args, k) if given else base.get(k) for k in ("n", "d", "c")}
    # --n active|total: the MoE parameter conventions of `scaling collect` (active: top-k experts per token)
    ndc["n"] = {"active": "params_active", "total": "params_total"}.get(ndc["n"] or "", ndc["n"])
    error = _y(args.y) if args.y else base.get("error")
    if args.group is not None:
        group = None if args.group == "none" else args.group
    else:
        group = base.get("group") if default else ("objective" if varies(args.table, "objective") else None)
    return Columns(**ndc, loss=args.loss or base.get("loss") or "val_loss", label=args.label or base.get("label"),
                   error=error, group=group)  # fmt: skip


def _scaling_plan(args: argparse.Namespace) -> int:
    from aimpre.scaling.sweep import format_plan, load_sweep, plan

    sweep, root = load_sweep(args.sweep)
    print(format_plan(plan(sweep, root, args.out)))
    print(f"configs and plan.json in {args.out}")
    return 0


def _scaling_run(args: argparse.Namespace) -> int:
    from aimpre import files
    from aimpre.scaling import runner

    if args.slurm or args.commands:
        for path, text in ((args.slurm, runner.slurm_script(args.plan, args.launcher, tuple(args.sbatch))),
                           (args.commands, runner.command_list(args.plan, args.launcher))):  # fmt: skip
            if path:
                files.write_text(path, text)
                print(f"wrote {path}")
        return 0
    from tqdm import tqdm

    runner.load_plan(args.plan)  # a plan refused is one line of its own, not one after the progress bar
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
    failed = [r.name for r in results if r.status in ("failed", "stopped")]
    tail = f"; failed: {', '.join(failed)}" if failed else ""
    print(f"{len(results) - len(failed)} of {len(results)} runs finished{tail}")
    return 1 if failed else 0


def _scaling_collect(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from aimpre.scaling.collect import collect, parse_probe, write_csv

    probe, bar, report = None, None, None
    if args.probe:
        from tqdm import tqdm

        settings = {k: v for k, v in (("epochs", args.probe_epochs), ("seed", args.probe_seed)) if v is not None}
        probe = replace(parse_probe(args.probe), settings=settings)
        bar = progress = tqdm(total=None, desc="probe", unit="run")

        def report(name: str, done: int, total: int, cached: bool) -> None:
            progress.total = total
            progress.update(1)
            progress.write(f"[{done}/{total}] {name}: " + ("probe result reused" if cached else "probed"))

    try:
        rows, missing = collect(args.runs, args.params, args.include_trunks, probe, report)
    finally:
        if bar is not None:
            bar.close()
    out = args.out or str(Path(args.runs) / "results.csv")
    write_csv(rows, out)
    print(f"{len(rows)} runs -> {out}" + (f"; not finished: {', '.join(missing)}" if missing else ""))
    return 0


def _scaling_fit(args: argparse.Namespace) -> int:
    from aimpre.scaling import report
    from aimpre.scaling.table import drop_highest, read_table

    table = read_table(args.table, _columns(args), args.flops_per_param)
    if args.bench:
        from aimpre.bench.fit import bench_fit

        print(bench_fit(drop_highest(table, args.drop_highest), args.scipy_every, args.numeric))
        return 0
    # downstream error is fitted on the best run per log-compute bin, as Cherti et al. 2023 (5 bins); the loss
    # keeps the frontier unless --bins is given
    bins = args.bins if args.bins is not None else (5 if table.columns.error and args.form == "power" else None)
    fits = report.fit_groups(
        table, args.form, objective=args.objective, bootstrap=args.bootstrap, seed=args.seed, ci=args.ci,
        with_e=not args.no_e, budgets=args.budgets, tol=args.tol, holdout=args.holdout, drop=args.drop_highest,
        bins=bins,
    )  # fmt: skip
    print(report.format_fits(fits))
    if args.json:
        report.write_json(fits, args.json)
        print(f"wrote {args.json}")
    return 0


def _scaling_predict(args: argparse.Namespace) -> int:
    from aimpre.scaling import report

    res = report.read_json(args.fit, args.group)
    pred = report.predict(res, args.flops, args.n_params, args.d_samples)
    print(json.dumps(pred) if args.json else report.format_prediction(pred))
    return 0


def _scaling_plot(args: argparse.Namespace) -> int:
    from aimpre.scaling import report
    from aimpre.scaling.plots import plot_objectives, plot_scaling
    from aimpre.scaling.table import read_table

    fits = report.read_fits(args.fit) if args.fit else {}
    fit = next(iter(fits.values()), None)
    k = args.flops_per_param if args.flops_per_param else (fit.flops_per_param if fit else None)
    table = read_table(args.table, _columns(args, fit.columns if fit else None), k)
    if table.columns.error or table.groups or len(fits) > 1:  # downstream error or several objectives
        out = plot_objectives(table, fits, args.out, args.bins or 5, args.title)
    else:
        out = plot_scaling(table, fit, args.out, args.budgets, args.tol, args.extrapolate, args.title)
    print(f"wrote {out}")
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
    r.add_argument("--jobs", type=INT_GT0, default=1, help="groups (a trunk and its branches, or one run) at a time")
    r.add_argument("--threads", type=INT_GT0, help="OMP threads per run (e.g. 1 with --jobs 2 on 2 cores)")
    r.add_argument("--launcher", help="replaces python in each training command, e.g. 'torchrun --nproc_per_node 8'")
    r.add_argument("--group", help="run only this group (what a SLURM array task does)")
    r.add_argument("--slurm", help="write a SLURM array script here instead of running")
    r.add_argument("--sbatch", action="append", default=[], help="extra #SBATCH option (repeatable)")
    r.add_argument("--commands", help="write one shell command per group here instead of running")
    r.set_defaults(fn=_scaling_run)

    c = ssub.add_parser("collect", help="gather finished runs into one CSV")
    c.add_argument("runs", help="a plan folder or any folder of run folders")
    c.add_argument("--out", help="CSV to write (default RUNS/results.csv)")
    c.add_argument(
        "--params",
        default="total",
        help="the 'params' column: total|encoder|total_nonemb|encoder_nonemb|"
        "active|encoder_active (MoE: the top-k experts a token uses)",
    )
    c.add_argument("--include-trunks", action="store_true", help="keep the constant-lr trunks of a cooldown sweep")
    c.add_argument("--probe", metavar="TRAIN[,TEST]", help="probe each run's encoder (attentive and linear) on these "
                   "labelled shards (demo:SPLIT or shard specs; no TEST: 20%% of TRAIN held out) and add "
                   "probe_*_top1 columns; results are kept as RUN/probe-<digest>.json and reused")  # fmt: skip
    c.add_argument("--probe-epochs", type=INT_GT0, help="probe training epochs (default 60)")
    c.add_argument("--probe-seed", type=int, help="probe init and shuffling seed (default 0)")
    c.set_defaults(fn=_scaling_collect)

    def columns(q: argparse.ArgumentParser) -> None:
        q.add_argument("table", help="results CSV")
        q.add_argument(
            "--n",
            help="parameters column (default 'params'; naming any of --n/--d/--c uses only those); "
            "active|total: params_active (MoE: the top-k experts a token uses) or params_total",
        )
        q.add_argument("--d", help="samples/tokens column (default 'samples'; without it D = C / (k N))")
        q.add_argument("--c", help="training FLOPs column (default 'flops')")
        q.add_argument("--loss", help="loss column (default 'val_loss')")
        q.add_argument("--label", help="column naming each run (default 'run' when present)")
        q.add_argument("--flops-per-param", type=FLOAT_GT0, help="k in C = k N D (default 6 when a column is derived)")
        q.add_argument("--budgets", type=FLOAT_GT0, nargs="+", help="iso-FLOP budgets (default: grouped by --tol)")
        q.add_argument("--tol", type=FLOAT_GT0, default=0.15, help="iso-FLOP budget tolerance, relative (0.15)")
        q.add_argument("--y", type=_y_arg, help="what to fit: loss (the --loss column, default), error_attentive / "
                       "error_linear (1 - collect --probe's top-1) or error:COLUMN (1 - any top-1 column)")  # fmt: skip
        q.add_argument("--bins", type=INT_GE2, help="power form: the best run of each of K equal-width log10-C bins "
                       "instead of the frontier (Cherti et al. 2023; default 5 for an error --y, else the "
                       "frontier)")  # fmt: skip
        q.add_argument("--group", help="fit each value of this column separately (default: 'objective' when the "
                       "table holds several; 'none': pool every row)")  # fmt: skip

    f = ssub.add_parser("fit", help="fit a scaling law to a results table")
    columns(f)
    f.add_argument("--form", default="chinchilla", choices=("chinchilla", "power", "isoflop"))
    f.add_argument("--objective", default="huber", choices=("huber", "likelihood", "squares"))
    f.add_argument("--no-e", action="store_true", help="power form without the irreducible loss E")
    f.add_argument("--bootstrap", type=COUNT, default=0, help="bootstrap resamples for the intervals")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--ci", type=PERCENT, default=95.0, help="interval coverage in percent")
    f.add_argument("--holdout", type=COUNT, default=0, help="leave out the K runs of largest compute and predict them")
    f.add_argument("--drop-highest", type=COUNT, default=0, help="drop the K runs of highest loss (Epoch: 5)")
    f.add_argument("--json", help="write the fit here")
    f.add_argument("--bench", action="store_true", help="time the batched fit against a scipy loop instead")
    f.add_argument("--scipy-every", type=INT_GT0, default=1, help="bench: the loop runs every k-th start")
    f.add_argument("--numeric", action="store_true", help="bench: the loop uses numerical gradients")
    f.set_defaults(fn=_scaling_fit)

    pr = ssub.add_parser("predict", help="compute-optimal N*, D* and loss at a budget, or the loss of (N, D)")
    pr.add_argument("fit", help="a fit JSON (aimpre scaling fit --json)")
    pr.add_argument("--flops", type=FLOAT_GT0, help="compute budget C")
    pr.add_argument("--n-params", type=FLOAT_GT0, help="parameters N (with --d-samples)")
    pr.add_argument("--d-samples", type=FLOAT_GT0, help="samples/tokens D (with --n-params)")
    pr.add_argument("--json", action="store_true", help="print JSON")
    pr.add_argument("--group", help="the fit of this group (e.g. an objective) in a per-group fit JSON")
    pr.set_defaults(fn=_scaling_predict)

    pt = ssub.add_parser("plot", help="the four-panel scaling figure, or error vs compute per objective (PNG)")
    columns(pt)
    pt.add_argument("--fit", help="a Chinchilla-form or power fit JSON (its columns are the default)")
    pt.add_argument("--out", required=True, help="PNG to write")
    pt.add_argument("--extrapolate", type=FACTOR, default=100.0, help="extend panels (c), (d) by this factor in C")
    pt.add_argument("--title")
    pt.set_defaults(fn=_scaling_plot)


def _export(args: argparse.Namespace) -> int:
    from aimpre.export import export_encoder

    out = export_encoder(args.src, args.format, args.out, args.dtype)
    info = read_json_object(out / "aimpre.json", "export record")
    print(f"{args.format} export of {args.src} (run {info['run']}, step {info['step']}, {args.dtype}) written to {out}")
    if args.format == "timm":
        conf = json.loads((out / "config.json").read_text())
        tag = conf["pretrained_cfg"].get("tag")  # set for a shape timm never released (aimpre.formats)
        arch = conf["architecture"]
        how = f"; timm has no model of this shape ({tag}): config.json builds it with timm's {arch} constructor and "
        print(f"load with timm.create_model('local-dir:{out}', pretrained=True)"
              + (how + "model_args" if tag else f" ({arch})"))  # fmt: skip
    elif args.format == "hf":
        print(f"load with transformers.Aimv2VisionModel.from_pretrained('{out}')")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from aimpre.probe import Layers, ProbeSettings, parse_size, run_probe

    given = {k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "seed")}
    settings = ProbeSettings(**{k: v for k, v in given.items() if v is not None})
    test = None if args.test == "none" else args.test
    encoder = Path(args.encoder[0])
    out = Path(args.out) if args.out else (encoder if encoder.is_dir() else encoder.parent) / "probe.json"
    layers = Layers(None if args.layers is None else tuple(args.layers), args.merge)
    res = run_probe(args.encoder[0], args.train, test, tuple(args.kind), settings, args.compare_random,
                    not args.no_cache, out, layers, args.raw_pixels,
                    None if args.img_size is None else parse_size(args.img_size), tuple(args.encoder[1:]),
                    args.fuse, args.native)  # fmt: skip
    what = "output" if args.layers is None else f"{args.merge} of blocks {', '.join(map(str, args.layers))}"
    if res["native"]:
        what += " at native resolution, canvas {} x {} patches or its transpose".format(*res["native"]["canvas"])
    print(f"{res['n_train']} train / {res['n_test']} test images, {res['classes']} classes; features: {what}; "
          f"top-1 on {res['test']} (and on the probe's own training images):")  # fmt: skip
    width = max(14, *(len(n) + 1 for n in res["results"]))
    print(f"{'':{width}}" + "".join(f"{k + ' (train)':>22}" for k in args.kind))
    for name, by_kind in res["results"].items():
        cells = (f"{by_kind[k]['top1']:.1%} ({by_kind[k]['train_top1']:.1%})" if k in by_kind else "-"
                 for k in args.kind)  # fmt: skip
        print(f"{name:{width}}" + "".join(f"{c:>22}" for c in cells))
    print(f"results: {out}")
    return 0


def _layers(args: argparse.Namespace) -> Any:
    """--layers / --merge as an ``aimpre.probe.Layers`` (None: the output)."""
    from aimpre.probe import Layers

    return None if args.layers is None else Layers(tuple(args.layers), args.merge)


def _probe_attributes(args: argparse.Namespace) -> int:
    from aimpre.eval.attributes import run_attributes
    from aimpre.probe import ProbeSettings

    given = {k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "seed")}
    settings = ProbeSettings(**{"epochs": 30, **{k: v for k, v in given.items() if v is not None}})
    out = _eval_out(args, "attributes.json")
    res = run_attributes(args.encoder[0], out, n_train=args.train_scenes, n_test=args.test_scenes,
                         readouts=tuple(args.readout), attributes=tuple(args.attribute), settings=settings,
                         baselines=not args.no_baselines, fuse=tuple(args.encoder[1:]),
                         fusion=args.fuse, layers=_layers(args))  # fmt: skip
    print(f"top-1 on {args.test_scenes} held-out scenes (probes trained on {args.train_scenes} others), "
          f"encoder / readout per row:")  # fmt: skip
    table: dict[tuple[str, str], dict[str, float]] = {}
    for r in res["rows"]:
        table.setdefault((r["encoder"], r["readout"]), {})[r["attribute"]] = r["top1"]
    width = max(24, *(len(e) + len(r) + 2 for e, r in table))
    print(f"{'':{width}}" + "".join(f"{a:>11}" for a in args.attribute))
    for (enc, readout), by_attr in table.items():
        print(f"{enc + ' ' + readout:{width}}" + "".join(f"{by_attr[a]:>11.1%}" for a in args.attribute))
    print(f"results: {out}")
    return 0


def _vlm_probe(args: argparse.Namespace) -> int:
    from aimpre.eval.vlm import Source, VLMRun, VLMSettings, run_vlm_probe

    sizes = args.img_size or [None]
    if len(sizes) not in (1, len(args.encoder)):
        raise ValueError(f"--img-size: give one size, or one per encoder ({len(args.encoder)}), not {len(sizes)}")
    sizes = sizes * len(args.encoder) if len(sizes) == 1 else sizes
    blocks = None if args.layers is None else tuple(args.layers)
    sources = []
    for n, (path, size) in enumerate(zip(args.encoder, sizes, strict=True)):
        name = path if args.encoder.count(path) == 1 else f"{path}#{n}"
        name += "" if size is None else f"@{size}"
        sources.append(Source(name, path, size, None if path == "pixels" else blocks, args.merge))
        if args.compare_random and path != "pixels":
            sources.append(Source(f"random_init({name})", path, size, blocks, args.merge, True, args.seed or 0))
    keys = ("connector", "fuse", "steps", "batch_size", "lr", "seed", "train_scenes", "test_scenes")
    given = {k: getattr(args, k) for k in keys}
    if args.digits is not None:
        given.update(train_digits=args.digits, test_digits=args.digits)
    settings = VLMSettings(**{k: v for k, v in given.items() if v is not None})
    out = Path(args.out) if args.out else Path("vlm-probe.json")
    res = run_vlm_probe(VLMRun(sources, settings), out)
    kinds = sorted({k for r in res["results"].values() for k in r["accuracy"]} - {"all"})
    print(f"VLM probe ({settings.connector} connector, {settings.steps} steps x {settings.batch_size}): exact match on "
          f"{res['n_test_items']} held-out questions; new = held-out templates; ppl = caption perplexity")  # fmt: skip
    width = max(14, *(len(n) + 1 for n in res["results"]))
    print(f"{'':{width}}" + "".join(f"{k[:10]:>11}" for k in [*kinds, "all", "new", "train"]) + f"{'ppl':>8}")
    for name, r in res["results"].items():
        accs = [r["accuracy"][k] for k in [*kinds, "all"]] + [r["new_templates"]["all"], r["train_accuracy"]["all"]]
        print(f"{name:{width}}" + "".join(f"{a:>11.1%}" for a in accs) + f"{r['caption_ppl']:>8.2f}")
    print(f"results: {out}")
    return 0


def _localize(args: argparse.Namespace) -> int:
    from aimpre.eval.localize import LocalizeSettings, run_localize

    given = {k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "seed", "window")}
    settings = LocalizeSettings(**{k: v for k, v in given.items() if v is not None})
    out = _eval_out(args, "localize.json")
    res = run_localize(args.encoder[0], out, n_train=args.train_scenes, n_test=args.test_scenes, settings=settings,
                       baselines=not args.no_baselines, fuse=tuple(args.encoder[1:]), fusion=args.fuse,
                       layers=_layers(args))  # fmt: skip
    keys = ("patch_iou", "patch_acc", "soft_iou", "box_iou", "box_acc50", "reg_box_iou")
    print(f"localizing a named shape in {args.test_scenes} held-out scenes (heads trained on {args.train_scenes}):")
    width = max(14, *(len(r["encoder"]) + 1 for r in res["rows"]))
    print(f"{'':{width}}" + "".join(f"{k:>11}" for k in keys))
    for r in res["rows"]:
        print(f"{r['encoder']:{width}}" + "".join(f"{r[k]:>11.3f}" for k in keys))
    print(f"results: {out}")
    return 0


def _eval_out(args: argparse.Namespace, name: str) -> Path:
    """--out, else ``name`` beside the (first) encoder (in it, for a directory)."""
    encoder = Path(args.encoder[0] if isinstance(args.encoder, list) else args.encoder)
    return Path(args.out) if args.out else (encoder if encoder.is_dir() else encoder.parent) / name


def _lit(args: argparse.Namespace) -> int:
    from aimpre.lit import TOWER_KEYS, LitSettings, train_lit

    given = {k: getattr(args, k) for k in ("epochs", "steps", "batch_size", "lr", "seed")}
    settings = LitSettings(loss=args.loss, **{k: v for k, v in given.items() if v is not None})
    towers = {k: getattr(args, k) for k in TOWER_KEYS if getattr(args, k) is not None}
    rec = train_lit(args.encoder, args.out, args.shards, settings, towers, args.tokenizer, not args.no_cache)
    print(f"LiT ({rec['loss']}) on {rec['samples']} captioned images, {rec['steps']} steps: loss "
          f"{rec['loss_initial']:.4f} -> {rec['loss_final']:.4f}; written to {args.out}")  # fmt: skip
    return 0


def _zero_shot(args: argparse.Namespace) -> int:
    from aimpre.lit import read_classes_file, zero_shot

    classes = None
    if args.classes is not None:
        classes = [c.strip() for c in args.classes.split(",")]
    elif args.classes_file is not None:
        classes = read_classes_file(args.classes_file)
    model = Path(args.model)
    out = Path(args.out) if args.out else (model if model.is_dir() else model.parent) / "zero_shot.json"
    res = zero_shot(args.model, args.shards, classes, args.templates, out, not args.no_cache)
    top5 = f", top-5 {res['top5']:.1%}" if "top5" in res else ""
    print(f"zero-shot on {args.shards}: {res['n']} images, {len(res['classes'])} classes (chance "
          f"{res['chance']:.1%}): top-1 {res['top1']:.1%}{top5}")  # fmt: skip
    for warning in res["warnings"]:  # a collapsed or chance-level classifier, which a bare top-1 hides
        print(f"aimpre: warning: zero-shot: {warning}", file=sys.stderr)
    print(f"results: {out}")
    return 0


def _visualize(args: argparse.Namespace) -> int:
    from aimpre.probe import parse_size
    from aimpre.visualize import visualize

    size = None if args.img_size is None else parse_size(args.img_size)
    for path in visualize(args.run, args.out, args.n, args.data, size):
        print(path)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from aimpre.compare import compare, format_table, plan, warnings
    from aimpre.compare_tasks import parse_settings

    evals = parse_settings(args.eval)  # before anything is trained: a bad --eval is one line and exit 2

    out = Path(args.out)
    # --img-size: every objective trains and is probed at that resolution (FLOPs per sample follow it)
    overrides = (*args.overrides, *([f"model.img_size={args.img_size}"] if args.img_size else []))
    planned = plan(
        tuple(args.objectives),
        args.config,
        overrides,
        args.flops,
        args.steps,
        out,
        not args.shared_recipe,
        args.teacher,
    )
    if planned:
        print(f"resolution: {planned[0].cfg.model.img_size} px ({planned[0].cfg.model.num_patches} patches)")
    print(f"{'objective':16}{'FLOPs/sample':>14}{'steps':>8}{'samples':>10}{'train FLOPs':>13}")
    for p in planned:
        print(f"{p.objective:16}{p.flops_per_sample:>14.3g}{p.steps:>8}{p.samples:>10}{p.flops:>13.3g}")
    epochs = {} if args.probe_epochs is None else {"epochs": args.probe_epochs}
    lit = None if args.no_lit else {"shards": args.lit_shards, "steps": args.lit_steps}
    res = compare(planned, out, tuple(range(args.seeds)), lit, args.probe_train, args.probe_test, epochs,
                  tuple(args.tasks), evals)  # fmt: skip
    print(format_table(res))
    for warning in warnings(res):  # in the table's notes too; here for a reader of the log's stderr
        print(f"aimpre: warning: compare: {warning}", file=sys.stderr)
    tasks_png = f", {out / 'compare-tasks.png'}" if res["scene_tasks"] else ""
    print(f"results: {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}{tasks_png}")
    return 0


# One example per command, shown under its --help (tests/test_cli_polish.py parses every one).
EXAMPLES = {
    "train": "aimpre train --config configs/aimv2_large.yaml run.name=l14 optim.lr=8e-4",
    "data demo": "aimpre data demo --out data/demo",
    "data make-shards": "aimpre data make-shards --from-folder photos/ --out shards/ --per-shard 1000",
    "data index": "aimpre data index 'shards/shard-{000000..000009}.tar'",
    "data inspect": "aimpre data inspect 'shards/shard-{000000..000009}.tar' --json",
    "data train-tokenizer": "aimpre data train-tokenizer demo --vocab-size 4096 --out tokenizer.json",
    "launch slurm": "aimpre launch slurm --config configs/aimv2_large.yaml --name l14 --nodes 2 > l14.sbatch",
    "launch torchrun": "aimpre launch torchrun --config configs/aimv2_large.yaml --name l14 --gpus-per-node 8",
    "bench loader": "aimpre bench loader --workers 4",
    "bench step": "aimpre bench step --size large --batch 128 --out step.md",
    "bench fp8": "aimpre bench fp8 --size large --steps 300 --batch 64 --out fp8.md --plot fp8.png",
    "bench attention": "aimpre bench attention --dtype bf16 --out attention.md",
    "bench gpu": "aimpre bench gpu --out gpu-check.md",
    "bench ops": "aimpre bench ops --size large --batch 128 --out ops.md",
    "model-info": "aimpre model-info huge",
    "config show": "aimpre config show --config configs/aimv2_large.yaml optim.lr=3e-4",
    "scaling plan": "aimpre scaling plan configs/sweeps/tiny_cpu.yaml --out sweeps/tiny",
    "scaling run": "aimpre scaling run sweeps/tiny --jobs 2 --threads 1",
    "scaling collect": "aimpre scaling collect sweeps/tiny",
    "scaling fit": "aimpre scaling fit sweeps/tiny/results.csv --form chinchilla --bootstrap 200 --json fit.json",
    "scaling predict": "aimpre scaling predict fit.json --flops 1e21",
    "scaling plot": "aimpre scaling plot sweeps/tiny/results.csv --fit fit.json --out scaling.png",
    "export": "aimpre export runs/l14 --format hf --out exports/l14-hf",
    "probe": "aimpre probe runs/l14 --train demo:digits-train --test demo:digits-test",
    "probe-attributes": "aimpre probe-attributes runs/l14 --train-scenes 2000 --test-scenes 1000",
    "localize": "aimpre localize runs/l14 --train-scenes 2000 --test-scenes 1000",
    "visualize": "aimpre visualize runs/l14 -n 4",
    "compare": "aimpre compare --objectives aimv2 aimv1 siglip clip classification --steps 300 --out compare",
    "lit": "aimpre lit runs/l14 --out lit/l14 --shards 'shards/shard-{000000..000099}.tar' --epochs 20",
    "vlm-probe": "aimpre vlm-probe runs/a runs/b --connector mlp --fuse concat --img-size 112 224",
    "zero-shot": "aimpre zero-shot lit/l14 --shards demo:digits-test --classes-file digits.txt",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends an option's default to its help unless the help already says it ("default", or the value in
    parentheses) or there is none to show (None, False, []); keeps the examples' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if d is None or d is False or d == [] or d == argparse.SUPPRESS or "default" in text or f"({d})" in text:
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        return f"{text} (default: %(default)s)".lstrip()

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is not None or not self._get_help_string(action):
            return super()._format_action(action)
        action.help = self._get_help_string(action)  # an option without help still shows its default
        try:
            return super()._format_action(action)
        finally:
            action.help = None


def _with_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Gives ``parser`` and every subcommand the defaults-showing formatter, its one-line help as description,
    and its example from ``EXAMPLES`` as epilog."""
    parser.formatter_class = _HelpFormatter
    command = parser.prog.removeprefix("aimpre").strip()
    if command in EXAMPLES:
        parser.epilog = f"example:\n  {EXAMPLES[command]}"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                child.description = child.description or helps.get(name)
                _with_help(child)
    return parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="aimpre", description="Pretrain vision encoders the AIMv2 way.")
    p.add_argument("--version", action="version", version=f"aimpre {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="pretrain (default: tiny AIMv2 on the embedded demo data, CPU, minutes)")
    t.add_argument("--config", help="YAML config (differences from the defaults)")
    t.add_argument("--resume", action="store_true", help="continue run.name from its last checkpoint, if any")
    t.add_argument(
        "--init",
        metavar="SOURCE",
        help="start from the weights of a run, checkpoint, aimpre export or "
        "released timm/HF AIMv2 encoder (run.init): fresh optimiser and step 0; pos_embed resampled",
    )
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=3e-4 model.depth=12")
    t.set_defaults(fn=_train)

    d = sub.add_parser("data", help="write and inspect shards")
    dsub = d.add_subparsers(dest="data_command", required=True)
    demo = dsub.add_parser("demo", help="write the embedded demo data set as webdataset shards")
    demo.add_argument("--out", required=True, help="directory to create")
    demo.set_defaults(fn=_data_demo)

    mk = dsub.add_parser("make-shards", help="write img2dataset-layout shards from a folder, a CSV/TSV or shards")
    src = mk.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-folder", help="images with sidecar captions (a.jpg + a.txt or a.json)")
    src.add_argument("--from-csv", help="CSV/TSV with a header; --path-col and --caption-col name the columns")
    src.add_argument("--from-shards", help="existing shards to re-shard (a spec with braces)")
    mk.add_argument("--out", required=True, help="directory to create")
    mk.add_argument("--per-shard", type=INT_GT0, default=1000, help="samples per shard (default 1000)")
    mk.add_argument("--max-side", type=INT_GT0, help="shrink images whose longer side is larger (JPEG q95)")
    mk.add_argument("--prefix", default="shard", help="shard file name prefix")
    mk.add_argument("--path-col", default="path")
    mk.add_argument("--caption-col", default="caption")
    mk.set_defaults(fn=_make_shards)

    ix = dsub.add_parser("index", help="count shards' samples into index.json beside them, or into --out")
    ix.add_argument("shards", help="shard spec, e.g. /data/{000000..000099}.tar or 'pipe:aws s3 cp ... -'")
    ix.add_argument("--out", help="index file to write (needed for pipe:/remote shards; then data.index=FILE)")
    ix.set_defaults(fn=_data_index)

    ins = dsub.add_parser("inspect", help="read a shard set through the training decode; report skips by reason")
    ins.add_argument("shards", help="shard spec, or demo[:SPLIT] for the built-in demo set (demo: its pretrain split)")
    ins.add_argument("--json", action="store_true", help='print {"read", "kept", "skipped", ...} as JSON')
    ins.add_argument("--workers", type=COUNT, default=2, help="decode processes (default 2)")
    ins.add_argument("--config", help="YAML config whose data/model settings to use")
    ins.add_argument("overrides", nargs="*", help="section.key=value")
    ins.set_defaults(fn=_data_inspect)

    tt = dsub.add_parser("train-tokenizer", help="train a byte-level BPE on the captions of a shard set")
    tt.add_argument("shards", help="shard spec, or demo[:SPLIT] for the built-in demo set (demo: its pretrain split)")
    tt.add_argument("--vocab-size", type=INT_GT0, required=True)
    tt.add_argument("--out", required=True, help="tokenizer.json to write")
    tt.add_argument("--max-samples", type=INT_GT0, help="use at most this many captions")
    tt.add_argument("--keep-case", action="store_true", help="do not lower-case captions")
    tt.set_defaults(fn=_train_tokenizer)

    la = sub.add_parser("launch", help="print the sbatch script or torchrun command(s) for a config")
    lsub = la.add_subparsers(dest="target", required=True)
    for target, what in (("slurm", "an sbatch script (requeued on preemption)"), ("torchrun", "torchrun commands")):
        lt = lsub.add_parser(target, help=what)
        lt.add_argument("--config", required=True)
        lt.add_argument("--name", required=True, help="run name (the run directory and the job name)")
        lt.add_argument("--nodes", type=int, default=1)
        lt.add_argument("--gpus-per-node", type=int, default=8)
        lt.add_argument("--out-dir", help="runs folder (default: the config's run.out_dir)")
        if target == "slurm":
            lt.add_argument("--time", default="48:00:00", help="SLURM time limit")
            lt.add_argument("--cpus", type=int, help="CPUs per task (default: data.num_workers + 1)")
            lt.add_argument("--python", default="python", help="the interpreter aimpre is installed in")
            lt.add_argument("--sbatch", action="append", default=[], help="an extra #SBATCH option, e.g. --account=x")
        else:
            lt.add_argument("--rdzv-endpoint", help="HOST:PORT of the rendezvous (needed for --nodes > 1)")
            lt.add_argument("--max-restarts", type=int, default=0, help="restarts of failed workers (each resumes)")
        lt.add_argument("overrides", nargs="*", help="section.key=value")
        lt.set_defaults(fn=_launch)

    b = sub.add_parser("bench", help="benchmarks that print a table, the peer measured in the same run")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    bl = bsub.add_parser("loader", help="our data pipeline vs a plain webdataset + torchvision one")
    bl.add_argument("shards", nargs="?", help="shard spec (default: write --synthetic JPEGs to a temp dir)")
    bl.add_argument("--synthetic", type=INT_GT0, default=2000, help="synthetic 512x384 JPEGs when no shards are given")
    bl.add_argument("--workers", type=COUNT, default=1, help="DataLoader workers for each pipeline (default 1)")
    bl.add_argument("--batch", type=INT_GT0, default=64)
    bl.add_argument("--batches", type=INT_GT0, default=30, help="timed batches after 3 warm-up batches")
    bl.add_argument("--rounds", type=INT_GT0, default=3, help="alternating rounds per pipeline; the median is shown")
    bl.set_defaults(fn=_bench_loader)
    bs = bsub.add_parser("step", help="one AIMv2 training step: plain compiled PyTorch vs ours, bf16 and fp8 (GPU)")
    bs.add_argument("--size", default="large")
    bs.add_argument("--batch", type=INT_GT0, default=128, help="per GPU (default 128)")
    bs.add_argument("--steps", type=INT_GT0, default=10, help="timed steps")
    bs.add_argument("--warmup", type=COUNT, default=3, help="untimed steps first (compilation happens in them)")
    bs.add_argument("--backend", default="triton", help="our attention backend (default triton)")
    bs.add_argument("--builds", type=_builds, default=list(BENCH_BUILDS), help="comma-separated subset of "
                    f"{','.join(BENCH_BUILDS)} (default: all)")  # fmt: skip
    bs.add_argument("--recipe", choices=FP8_RECIPES, default="tensorwise", help="the fp8 build's float8 recipe")
    bs.add_argument("--quick", action="store_true", help="a CPU smoke run of a tiny model")
    bs.add_argument("--out", help="also write the report to this markdown file")
    bs.set_defaults(fn=_bench_step)
    bf = bsub.add_parser("fp8", help="training loss with fp8 vs bf16: same weights, same batches (GPU)")
    bf.add_argument("--size", default="large")
    bf.add_argument("--steps", type=INT_GT0, default=300, help="optimiser steps per build")
    bf.add_argument("--batch", type=INT_GT0, default=64)
    bf.add_argument("--log-every", type=INT_GT0, default=10, help="steps per logged window (mean loss)")
    bf.add_argument("--recipe", choices=FP8_RECIPES, default="tensorwise", help="torchao's float8 recipe")
    bf.add_argument("--quick", action="store_true", help="a CPU smoke run: tiny model, 6 steps, batch 4")
    bf.add_argument("--out", help="also write the report to this markdown file")
    bf.add_argument("--plot", help="draw both loss curves to this PNG")
    bf.set_defaults(fn=_bench_fp8)
    ba = bsub.add_parser("attention", help="Triton attention vs FlexAttention, SDPA, xformers on the AIMv2 shapes: "
                         "GPU time, wall back to back and wall of one call, forward + backward")  # fmt: skip
    ba.add_argument(
        "--quick", action="store_true", help="tiny shapes, 1 call per timing: a smoke test (always so without a GPU)"
    )
    ba.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ba.add_argument("--reps", type=INT_GT0, default=20, help="calls per wall-time measurement (back to back: their "
                    "mean; single call: their median)")  # fmt: skip
    ba.add_argument("--out", help="also write the report to this markdown file")
    ba.set_defaults(fn=_bench_attention)
    from aimpre.gpucheck import BUDGET_S, STEP_NAMES

    bg = bsub.add_parser("gpu", help="the device check: GPU tests, then bench attention, ops, step and fp8, each in a "
                         "subprocess with a timeout, into one markdown report")  # fmt: skip
    bg.add_argument("--out", default="gpu-check.md", help="the report to write")
    bg.add_argument("--budget-s", type=FLOAT_GT0, default=BUDGET_S, help="seconds for all steps; later steps' timeouts "
                    "shrink to what is left")  # fmt: skip
    bg.add_argument("--steps", nargs="+", choices=STEP_NAMES, help="run only these steps (default: all, in order)")
    bg.add_argument("--allow-cpu", action="store_true", help="run without CUDA as a dry run (benches in --quick mode)")
    bg.add_argument("--quick", action="store_true", help="benches in their --quick mode: a smoke test of the check")
    bg.set_defaults(fn=_bench_gpu)
    bo = bsub.add_parser("ops", help="fused RMSNorm, SwiGLU, text head + cross-entropy: liger vs torch and Inductor")
    bo.add_argument("--size", default="large", help="the model size whose shapes to use (default large)")
    bo.add_argument("--batch", type=INT_GT0, default=128, help="images per step (default 128)")
    bo.add_argument("--reps", type=INT_GT0, default=20, help="timed runs per measurement (median reported)")
    ops = ("rmsnorm", "add_rmsnorm", "swiglu", "linear_ce")  # aimpre.bench.ops.OPS (not imported here)
    bo.add_argument("--ops", nargs="+", choices=ops, default=list(ops), help="which ops (default all)")
    bo.add_argument("--quick", action="store_true", help="tiny shapes, 2 runs: a smoke test (always so without a GPU)")
    bo.add_argument("--out", help="also write the report to this markdown file")
    bo.set_defaults(fn=_bench_ops)

    mi = sub.add_parser("model-info", help="parameter counts and training FLOPs of a size or config")
    mi.add_argument("name", help="a size (tiny, large, huge, 1b, 3b) or a YAML config file")
    mi.add_argument("--json", action="store_true", help="print one JSON object")
    mi.add_argument("--img-size", type=INT_GT0, help="count FLOPs per sample at this resolution (model.img_size)")
    mi.add_argument("--area", type=INT_GT0, help="also count FLOPs per sample at an image of this many patches, any "
                    "grid (native resolution; a native config lists its areas 2^lo..2^hi without it)")  # fmt: skip
    mi.set_defaults(fn=_model_info)
    cf = sub.add_parser("config", help="show the resolved configuration")
    csub = cf.add_subparsers(dest="config_command", required=True)
    cs = csub.add_parser("show", help="every config key with its value and what it does")
    cs.add_argument("--config", help="YAML config (differences from the defaults)")
    cs.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.size=large")
    cs.set_defaults(fn=_config_show)
    _add_scaling(sub)

    e = sub.add_parser("export", help="write a run's encoder for timm, Hugging Face transformers or as safetensors")
    e.add_argument("src", help="a run directory, a checkpoint (.ckpt) or another export")
    e.add_argument("--format", required=True, choices=("timm", "hf", "safetensors"))
    e.add_argument("--out", required=True, help="directory to create")
    e.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    e.set_defaults(fn=_export)

    pr = sub.add_parser("probe", help="frozen-trunk attentive and linear probes on labelled shards")
    pr.add_argument("encoder", nargs="+", help="a run, checkpoint, export, or timm/HF AIMv2 model directory; more "
                    "(or 'pixels') are probed each alone and fused with the first, on its token grid")  # fmt: skip
    pr.add_argument("--fuse", choices=("concat", "sum"), default="concat", help="how several encoders' tokens "
                    "combine (concatenated, or projected to one width and summed; default concat)")  # fmt: skip
    pr.add_argument("--train", default="demo:digits-train", help="labelled shards (demo:SPLIT or a shard spec)")
    pr.add_argument("--test", default="demo:digits-test", help="held-out labelled shards; 'none': 20%% of --train")
    pr.add_argument("--kind", nargs="+", default=["attentive", "linear"], choices=("attentive", "linear"))
    pr.add_argument("--epochs", type=INT_GT0, help="probe training epochs (default 60)")
    pr.add_argument("--lr", type=FLOAT_GT0, help="peak AdamW learning rate (default 1e-2)")
    pr.add_argument("--batch-size", type=INT_GT0, help="default 64")
    pr.add_argument("--seed", type=int, help="probe init, shuffling and the random-init twin (default 0)")
    pr.add_argument("--compare-random", action="store_true", help="also probe the architecture at random init")
    pr.add_argument("--raw-pixels", action="store_true", help="also train the linear probe on the raw normalised "
                    "pixels at the encoder's resolution (the baseline an encoder has to beat)")  # fmt: skip
    pr.add_argument("--no-cache", action="store_true", help="do not cache features in $AIMPRE_CACHE/features")
    pr.add_argument("--out", help="results JSON (default: probe.json in the encoder's directory)")
    pr.add_argument("--layers", type=int, nargs="+", help="probe these blocks (0-based; -1 the last) instead of the "
                    "output, each through the final norm (default: the encoder's output)")  # fmt: skip
    pr.add_argument("--merge", choices=("mean", "concat"), default="mean", help="how --layers' blocks combine")
    pr.add_argument("--img-size", help="probe at S or HxW pixels (e.g. 224x336: a sincos2d encoder runs any grid; "
                    "the centre HxW of the centre square); default: the encoder's own size")  # fmt: skip
    pr.add_argument("--native", type=INT_GT0, metavar="N", help="a sincos2d encoder at native resolution: each image "
                    "whole, aspect kept, zero-padded on a canvas of 2^N patches (wide, or its transpose for a tall "
                    "image); the heads skip the padding")  # fmt: skip
    pr.set_defaults(fn=_probe)

    from aimpre.eval.names import ATTRIBUTE_NAMES, READOUTS

    for command, what in (("probe-attributes", "attributes"), ("localize", "localize")):
        help_ = (
            "held-out scene-attribute probes (count, shape, colour, size, row, column, background) beside random "
            "init, raw pixels and the majority class"
            if what == "attributes"
            else "localization probe: which patches a named shape covers and its box, on held-out scenes, beside "
            "random init, raw pixels and the mean prediction"
        )
        ev = sub.add_parser(command, help=help_)
        ev.add_argument("encoder", nargs="+", help="a run, checkpoint, export, or timm/HF AIMv2 model directory; more "
                        "(or 'pixels') are probed each alone and fused with the first")  # fmt: skip
        ev.add_argument("--fuse", choices=("concat", "sum"), default="concat", help="how several encoders' tokens "
                        "combine (concatenated, or projected to one width and summed; default concat)")  # fmt: skip
        ev.add_argument("--train-scenes", type=INT_GT0, default=2000, help="held-out scenes the heads train on")
        ev.add_argument("--test-scenes", type=INT_GT0, default=1000, help="other held-out scenes they are scored on")
        ev.add_argument("--epochs", type=INT_GT0, help="head training epochs (default 30)")
        ev.add_argument("--lr", type=FLOAT_GT0, help="peak AdamW learning rate (default " +
                        ("1e-2)" if what == "attributes" else "3e-3)"))  # fmt: skip
        ev.add_argument("--batch-size", type=INT_GT0, help="default 64")
        ev.add_argument("--seed", type=int, help="head init, shuffling and the random-init twin (default 0)")
        ev.add_argument("--no-baselines", action="store_true", help="only the encoder: no random-init, pixel or "
                        "majority/mean rows")  # fmt: skip
        ev.add_argument("--out", help=f"results JSON (default: {what}.json in the encoder's directory)")
        ev.add_argument("--layers", type=int, nargs="+", help="read the encoder and its random-init twin at these "
                        "blocks (0-based; -1 the last), each through the final norm, not the output")  # fmt: skip
        ev.add_argument("--merge", choices=("mean", "concat"), default="mean", help="how --layers' blocks combine")
        if what == "localize":
            ev.add_argument("--window", type=int, choices=(1, 3, 5), help="the mask head reads each patch's W x W "
                            "neighbourhood of tokens (default 1: its own token; 3 for tokens that describe a "
                            "neighbour, as AIMv2's next-patch objective makes them)")  # fmt: skip
        if what == "attributes":
            ev.add_argument("--attribute", nargs="+", default=list(ATTRIBUTE_NAMES), choices=ATTRIBUTE_NAMES)
            ev.add_argument("--readout", nargs="+", default=list(READOUTS), choices=READOUTS,
                            help="attentive, linear (mean-pooled) or patch (linear on all tokens)")  # fmt: skip
        ev.set_defaults(fn=_probe_attributes if what == "attributes" else _localize)

    vp = sub.add_parser("vlm-probe", help="a tiny VLM on frozen encoder tokens: question answering about held-out "
                        "demo scenes and digits, per question type, against a text-only baseline")  # fmt: skip
    vp.add_argument("encoder", nargs="+", help="runs, checkpoints, exports, or 'pixels' (raw patches); two or more "
                    "are also probed fused")  # fmt: skip
    vp.add_argument("--connector", choices=("linear", "mlp", "xattn"), help="tokens -> language model (default mlp)")
    vp.add_argument("--fuse", choices=("concat", "sum"), help="how several encoders' tokens combine (default concat)")
    vp.add_argument("--img-size", type=INT_GT0, nargs="+", help="input size in pixels, one for all or one per "
                    "encoder (default: each one's trained size; larger resamples its position table)")  # fmt: skip
    vp.add_argument("--layers", type=int, nargs="+", help="read these blocks (0-based; -1 the last) instead of the "
                    "output, each through the final norm")  # fmt: skip
    vp.add_argument("--merge", choices=("mean", "concat"), default="concat", help="how --layers' blocks combine")
    vp.add_argument("--steps", type=INT_GT0, help="training steps, the same for every row (default 1500)")
    vp.add_argument("--batch-size", type=INT_GT0, help="default 64")
    vp.add_argument("--lr", type=FLOAT_GT0, help="peak AdamW learning rate (default 1e-3)")
    vp.add_argument("--train-scenes", type=INT_GT0, help="rendered training scenes (default 2000)")
    vp.add_argument("--test-scenes", type=INT_GT0, help="held-out scenes (default 300)")
    vp.add_argument("--digits", type=INT_GT0, help="at most this many digits per split (default: all 1258 training "
                    "digits, 300 held-out ones)")  # fmt: skip
    vp.add_argument("--seed", type=int, help="model init, batches, templates and the random-init twins (default 0)")
    vp.add_argument("--compare-random", action="store_true", help="also probe each encoder's architecture at random "
                    "init")  # fmt: skip
    vp.add_argument("--out", help="results JSON (default: vlm-probe.json here)")
    vp.set_defaults(fn=_vlm_probe)

    li = sub.add_parser("lit", help="LiT: train a text tower (and image head) against a frozen encoder")
    li.add_argument("encoder", help="a run, checkpoint, export, or timm/HF AIMv2 model directory (kept frozen)")
    li.add_argument("--out", required=True, help="LiT folder to create")
    li.add_argument("--shards", default="demo", help="captioned shards (a spec; demo: the demo's pretrain split)")
    li.add_argument("--loss", choices=("siglip", "clip"), default="siglip")
    li.add_argument("--epochs", type=INT_GT0, help="passes over the shards (default 20)")
    li.add_argument("--steps", type=INT_GT0, help="training steps (replaces --epochs)")
    li.add_argument("--batch-size", type=INT_GT0, help="default 128")
    li.add_argument("--lr", type=FLOAT_GT0, help="peak AdamW learning rate (default 1e-3)")
    li.add_argument("--seed", type=int, help="tower init and shuffling (default 0)")
    li.add_argument("--tokenizer", help="'bytes' or a tokenizer.json (default: the encoder's run's, else bytes)")
    for key, what in (("embed-dim", "shared embedding width"), ("text-width", "text tower width"),
                      ("text-depth", "text tower blocks"), ("text-heads", "text tower heads"),
                      ("text-mlp-hidden", "text tower SwiGLU width"), ("text-len", "caption tokens")):  # fmt: skip
        li.add_argument(f"--{key}", type=INT_GT0, help=f"{what} (default: the encoder size's)")
    li.add_argument("--pool", choices=("map", "mean"), help="image and text pooling (default: the encoder size's)")
    li.add_argument("--no-cache", action="store_true", help="do not cache tokens in $AIMPRE_CACHE/lit-features")
    li.set_defaults(fn=_lit)

    zs = sub.add_parser("zero-shot", help="zero-shot top-1 of a LiT folder or a siglip/clip run on labelled shards")
    zs.add_argument("model", help="a LiT folder (aimpre lit), or a siglip/clip run or checkpoint")
    zs.add_argument("--shards", required=True, help="labelled shards (demo:SPLIT or a shard spec)")
    names = zs.add_mutually_exclusive_group()
    names.add_argument("--classes", help="class names in label order, comma-separated (default: from beside the "
                       "shards: index.json splits[NAME].classes or classes.txt)")  # fmt: skip
    names.add_argument("--classes-file", help="class names, one a line in label order")
    zs.add_argument("--templates", nargs="+", help="prompt templates, each with one {} (default: a small ensemble)")
    zs.add_argument("--no-cache", action="store_true", help="do not cache tokens in $AIMPRE_CACHE/features")
    zs.add_argument("--out", help="results JSON (default: zero_shot.json in the model's directory)")
    zs.set_defaults(fn=_zero_shot)

    v = sub.add_parser("visualize", help="PNGs: next-patch predictions, loss curves, encoder attention maps")
    v.add_argument("run", help="a run directory")
    v.add_argument("--out", help="output directory (default RUN/figures)")
    v.add_argument("-n", type=INT_GT0, default=6, help="images per figure")
    v.add_argument("--data", help="shards to draw images from (default: the run's validation shards)")
    v.add_argument("--img-size", help="draw at S or HxW pixels (e.g. 56x84: a sincos2d run draws any grid; the "
                   "centre HxW of the centre square); default: the run's model.img_size")  # fmt: skip
    v.set_defaults(fn=_visualize)

    c = sub.add_parser("compare", help="train one encoder per objective at equal training FLOPs; probe, zero-shot, "
                       "one table and a bar chart")  # fmt: skip
    c.add_argument("--objectives", nargs="+", default=list(COMPARE_DEFAULT), choices=COMPARE_ROWS,
                   help="rows: objectives, and aimv2-moe (AIMv2 with 4-expert MoE encoder blocks)")  # fmt: skip
    c.add_argument("--teacher", help="the teacher encoder of the distill and aimv2_distill rows (a run, "
                   "checkpoint or export); their FLOPs count its forward")  # fmt: skip
    budget = c.add_mutually_exclusive_group()
    budget.add_argument("--flops", type=FLOAT_GT0, help="training FLOPs per objective (default: what aimv2 costs "
                        "in --steps steps)")  # fmt: skip
    budget.add_argument("--steps", type=INT_GT0, help="the budget is aimv2's FLOPs in this many steps "
                        "(default: the config's trainer.max_steps)")  # fmt: skip
    c.add_argument(
        "--img-size",
        type=INT_GT0,
        help="compare at this resolution (model.img_size; a multiple of the "
        "patch): every objective trains and is probed at it, FLOPs per sample counted at it",
    )
    c.add_argument("--seeds", type=INT_GT0, default=3, help="probe seeds (0 .. N-1)")
    c.add_argument("--probe-epochs", type=INT_GT0, help="probe training epochs (default 60)")
    c.add_argument("--no-lit", action="store_true", help="no LiT zero-shot for the non-contrastive encoders")
    c.add_argument("--lit-shards", default="demo:digits-train", help="captioned shards LiT trains on")
    c.add_argument("--lit-steps", type=INT_GT0, default=600, help="LiT training steps")
    c.add_argument("--probe-train", default="demo:digits-train", help="labelled shards the probes train on")
    c.add_argument("--probe-test", default="demo:digits-test", help="labelled shards for probe and zero-shot top-1")
    c.add_argument("--tasks", nargs="+", default=list(COMPARE_TASKS), choices=COMPARE_TASKS,
                   help="evaluations: the digit probes, zero-shot, and the held-out scene attributes, localization "
                   "and VLM probe (default: all)")  # fmt: skip
    c.add_argument("--eval", action="append", default=[], metavar="KEY=VALUE", help="the scene probes' budget "
                   "(aimpre.compare_tasks.EvalSettings), once per key, e.g. --eval vlm_steps=300")  # fmt: skip
    c.add_argument("--out", default="compare", help="folder of the runs and results (reused when present)")
    c.add_argument("--shared-recipe", action="store_true", help="train every objective with the shared config, "
                   "without its own lr, batch and augmentation (aimpre.compare.RECIPES)")  # fmt: skip
    c.add_argument("--config", help="YAML base config for every objective (default: the demo job)")
    c.add_argument("overrides", nargs="*", help="section.key=value for every objective, e.g. data.batch_size=64")
    c.set_defaults(fn=_compare)
    return _with_help(p)


def _user_error(e: BaseException) -> bool:
    """Errors whose message tells the user what to fix: printed as one line. Anything else is a bug in aimpre
    and keeps its traceback."""
    from aimpre.config import RunError
    from aimpre.files import NO_ROOM

    if isinstance(e, ValueError | RunError):  # ConfigError is a ValueError
        return True
    if isinstance(e, FileNotFoundError | FileExistsError | IsADirectoryError | NotADirectoryError | PermissionError):
        return True
    if isinstance(e, OSError):
        # one without a file name is only the user's to fix when the disk is full (or a quota or size limit hit)
        return e.filename is not None or e.errno in NO_ROOM
    return _lightning_refused(e)


def _lightning_refused(e: BaseException) -> bool:
    lightning = sys.modules.get("lightning.fabric.utilities.exceptions")  # loaded whenever a Trainer was built
    return lightning is not None and isinstance(e, lightning.MisconfigurationException)


def _one_line(e: BaseException, limit: int = 2000) -> str:
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    if _lightning_refused(e):  # e.g. "No supported gpu backend found!": say which settings it is about
        text = f"Lightning refused the trainer.* settings on this machine: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except Exception as e:
        if not _user_error(e):
            raise
        print(f"aimpre: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
