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
    return p


def main(argv: list[str] | None = None) -> int:
    from aimpre.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"aimpre: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
