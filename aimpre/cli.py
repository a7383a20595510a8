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


def _export(args: argparse.Namespace) -> int:
    from aimpre.export import export_encoder

    out = export_encoder(args.src, args.format, args.out, args.dtype)
    info = json.loads((out / "aimpre.json").read_text())
    print(f"{args.format} export of {args.src} (run {info['run']}, step {info['step']}, {args.dtype}) written to {out}")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from aimpre.probe import ProbeSettings, run_probe

    given = {k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "seed")}
    settings = ProbeSettings(**{k: v for k, v in given.items() if v is not None})
    test = None if args.test == "none" else args.test
    res = run_probe(args.encoder, args.train, test, tuple(args.kind), settings, args.compare_random,
                    not args.no_cache, Path(args.out))  # fmt: skip
    print(f"{res['n_train']} train / {res['n_test']} test images, {res['classes']} classes; top-1 on {res['test']}:")
    print(f"{'':14}" + "".join(f"{k:>12}" for k in args.kind))
    for name, by_kind in res["results"].items():
        print(f"{name:14}" + "".join(f"{by_kind[k]['top1']:>12.1%}" for k in args.kind))
    print(f"results: {args.out}")
    return 0


def _visualize(args: argparse.Namespace) -> int:
    from aimpre.visualize import visualize

    for path in visualize(args.run, args.out, args.n, args.data):
        print(path)
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

    mi = sub.add_parser("model-info", help="parameter counts and training FLOPs of a size or config")
    mi.add_argument("name", help="a size (tiny, large, huge, 1b, 3b) or a YAML config file")
    mi.add_argument("--json", action="store_true", help="print one JSON object")
    mi.set_defaults(fn=_model_info)

    e = sub.add_parser("export", help="write a run's encoder for timm, Hugging Face transformers or as safetensors")
    e.add_argument("src", help="a run directory, a checkpoint (.ckpt) or another export")
    e.add_argument("--format", required=True, choices=("timm", "hf", "safetensors"))
    e.add_argument("--out", required=True, help="directory to create")
    e.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    e.set_defaults(fn=_export)

    pr = sub.add_parser("probe", help="frozen-trunk attentive and linear probes on labelled shards")
    pr.add_argument("encoder", help="a run, checkpoint, export, or timm/HF AIMv2 model directory")
    pr.add_argument("--train", default="demo:digits-train", help="labelled shards (demo:SPLIT or a shard spec)")
    pr.add_argument("--test", default="demo:digits-test", help="held-out labelled shards; 'none': 20%% of --train")
    pr.add_argument("--kind", nargs="+", default=["attentive", "linear"], choices=("attentive", "linear"))
    pr.add_argument("--epochs", type=int, help="probe training epochs (default 60)")
    pr.add_argument("--lr", type=float, help="peak AdamW learning rate (default 1e-2)")
    pr.add_argument("--batch-size", type=int, help="default 64")
    pr.add_argument("--seed", type=int, help="probe init, shuffling and the random-init twin (default 0)")
    pr.add_argument("--compare-random", action="store_true", help="also probe the architecture at random init")
    pr.add_argument("--no-cache", action="store_true", help="do not cache features in $AIMPRE_CACHE/features")
    pr.add_argument("--out", default="probe.json", help="results JSON")
    pr.set_defaults(fn=_probe)

    v = sub.add_parser("visualize", help="PNGs: next-patch predictions, loss curves, encoder attention maps")
    v.add_argument("run", help="a run directory")
    v.add_argument("--out", help="output directory (default RUN/figures)")
    v.add_argument("-n", type=int, default=6, help="images per figure")
    v.add_argument("--data", help="shards to draw images from (default: the run's validation shards)")
    v.set_defaults(fn=_visualize)
    return p


def main(argv: list[str] | None = None) -> int:
    from aimpre.config import ConfigError
    from aimpre.formats import ExportError
    from aimpre.probe import ProbeError

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (ConfigError, ExportError, ProbeError, FileNotFoundError, FileExistsError) as e:
        print(f"aimpre: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
