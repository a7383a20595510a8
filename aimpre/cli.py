"""The ``aimpre`` command: parses arguments and calls the library. No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
    return 0


def _data_index(args: argparse.Namespace) -> int:
    from aimpre.data.shardset import count_samples, expand_shards, is_local, read_index, write_index

    by_dir: dict[Path, dict[str, int]] = {}
    for url in expand_shards(args.shards):
        if not is_local(url):
            raise ValueError(f"{url}: only local shards can be indexed in place")
        p = Path(url)
        by_dir.setdefault(p.parent, read_index(p.parent))[p.name] = count_samples(url)
    for directory, counts in by_dir.items():
        print(f"{write_index(directory, counts)}: {len(counts)} shards, {sum(counts.values())} samples")
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from aimpre.config import load_config
    from aimpre.data import Augment, build_tokenizer, shard_set
    from aimpre.data.scan import inspect_shards

    cfg = load_config(args.config, args.overrides)
    d, m = cfg.data, cfg.model
    aug = Augment(m.img_size, scale=d.crop_scale, hflip=d.hflip, max_pixels=d.max_pixels)
    tok = build_tokenizer(d.tokenizer, d.lowercase)
    report = inspect_shards(shard_set(args.shards, need_counts=False), aug, tok, m.text_len, args.workers)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"read {report['read']}, kept {report['kept']} from {report['shards']} shard(s)")
        for reason, n in sorted(report["skipped"].items()):
            print(f"  skipped {reason:14} {n}")
        for kind, n in sorted(report["errors"].items()):
            print(f"  read error {kind:11} {n}")
        print(f"  captions cut at {m.text_len} tokens: {report['truncated_captions']}")
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from aimpre.data import shard_set
    from aimpre.data.scan import iter_captions
    from aimpre.data.tokenizer import build_tokenizer, train_bpe

    captions = iter_captions(shard_set(args.shards, need_counts=False), args.max_samples)
    out = train_bpe(captions, args.vocab_size, Path(args.out), lowercase=not args.keep_case)
    tok = build_tokenizer(str(out), lowercase=not args.keep_case)
    print(f"wrote {out}: vocabulary {tok.vocab_size}, pad id {tok.pad_id}, end-of-text id {tok.eos_id}")
    return 0


def _bench_loader(args: argparse.Namespace) -> int:
    import platform
    import tempfile

    import torch

    from aimpre.data.bench import bench_loader, synthetic_shards

    spec = args.shards
    with tempfile.TemporaryDirectory() as tmp:
        if spec is None:
            print(f"writing {args.synthetic} synthetic 512x384 JPEGs ...", flush=True)
            spec = synthetic_shards(Path(tmp), args.synthetic)
        rows = bench_loader(spec, args.workers, args.batch, args.batches)
    cpu = platform.processor() or platform.machine()
    print(f"loader throughput, {args.workers} worker(s), batch {args.batch}, {cpu}, torch {torch.__version__}")
    print(f"{'pipeline':42}{'img/s':>10}{'per worker':>12}{'vs plain':>10}")
    for r in rows:
        print(f"{r['pipeline']:42}{r['img_per_s']:>10.1f}{r['per_worker']:>12.1f}{r['vs_plain']:>9.2f}x")
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


def _bench_attention(args: argparse.Namespace) -> int:
    from aimpre.kernels.bench import run_attention

    run_attention(quick=args.quick, dtype=args.dtype, reps=args.reps, out=args.out)
    return 0


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

    mk = dsub.add_parser("make-shards", help="write img2dataset-layout shards from a folder, a CSV/TSV or shards")
    src = mk.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-folder", help="images with sidecar captions (a.jpg + a.txt or a.json)")
    src.add_argument("--from-csv", help="CSV/TSV with a header; --path-col and --caption-col name the columns")
    src.add_argument("--from-shards", help="existing shards to re-shard (a spec with braces)")
    mk.add_argument("--out", required=True, help="directory to create")
    mk.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    mk.add_argument("--max-side", type=int, help="shrink images whose longer side is larger (JPEG q95)")
    mk.add_argument("--prefix", default="shard", help="shard file name prefix")
    mk.add_argument("--path-col", default="path")
    mk.add_argument("--caption-col", default="caption")
    mk.set_defaults(fn=_make_shards)

    ix = dsub.add_parser("index", help="count the samples of local shards into index.json beside them")
    ix.add_argument("shards", help="shard spec, e.g. /data/{000000..000099}.tar")
    ix.set_defaults(fn=_data_index)

    ins = dsub.add_parser("inspect", help="read a shard set through the training decode; report skips by reason")
    ins.add_argument("shards", help="shard spec")
    ins.add_argument("--json", action="store_true", help='print {"read", "kept", "skipped", ...} as JSON')
    ins.add_argument("--workers", type=int, default=2, help="decode processes (default 2)")
    ins.add_argument("--config", help="YAML config whose data/model settings to use")
    ins.add_argument("overrides", nargs="*", help="section.key=value")
    ins.set_defaults(fn=_data_inspect)

    tt = dsub.add_parser("train-tokenizer", help="train a byte-level BPE on the captions of a shard set")
    tt.add_argument("shards", help="shard spec")
    tt.add_argument("--vocab-size", type=int, required=True)
    tt.add_argument("--out", required=True, help="tokenizer.json to write")
    tt.add_argument("--max-samples", type=int, help="use at most this many captions")
    tt.add_argument("--keep-case", action="store_true", help="do not lower-case captions")
    tt.set_defaults(fn=_train_tokenizer)

    b = sub.add_parser("bench", help="benchmarks that print a table, the peer measured in the same run")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    bl = bsub.add_parser("loader", help="our data pipeline vs a plain webdataset + torchvision one")
    bl.add_argument("shards", nargs="?", help="shard spec (default: write --synthetic JPEGs to a temp dir)")
    bl.add_argument("--synthetic", type=int, default=2000, help="synthetic 512x384 JPEGs when no shards are given")
    bl.add_argument("--workers", type=int, default=1, help="DataLoader workers for each pipeline (default 1)")
    bl.add_argument("--batch", type=int, default=64)
    bl.add_argument("--batches", type=int, default=30, help="timed batches after 3 warm-up batches")
    bl.set_defaults(fn=_bench_loader)
    ba = bsub.add_parser("attention", help="Triton attention vs FlexAttention, SDPA, xformers on the AIMv2 shapes")
    ba.add_argument("--quick", action="store_true", help="tiny shapes, 2 runs: a smoke test (always so without a GPU)")
    ba.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ba.add_argument("--reps", type=int, default=20, help="timed runs per measurement (median reported)")
    ba.add_argument("--out", help="also write the report to this markdown file")
    ba.set_defaults(fn=_bench_attention)

    mi = sub.add_parser("model-info", help="parameter counts and training FLOPs of a size or config")
    mi.add_argument("name", help="a size (tiny, large, huge, 1b, 3b) or a YAML config file")
    mi.add_argument("--json", action="store_true", help="print one JSON object")
    mi.set_defaults(fn=_model_info)
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
