"""Pictures of a run: next-patch predictions beside the originals, the loss curves, encoder attention maps.

- Predictions: AIMv2's pixel head at image position i regresses patch i+1 standardised by that patch's own mean and
  variance (Fini et al. 2024; apple/ml-l3m ``RasterPixelLoss`` with ``norm_pix_loss``), so a prediction has no
  brightness or contrast of its own. To draw it, each predicted patch is mapped back with its *target* patch's
  mean/std, as MAE's figures do; the figure title says so, since that borrows two numbers per patch from the answer.
  The standardisation is over all of a patch's RGB values together, so a target keeps which channel is higher but
  not how bright, how contrasted or how saturated the patch is: the colour drawn comes from the original.
  Patches inside the prefix are not prediction targets: they are drawn from the original, faded.
  Only AIMv2 runs have them (the other objectives have no pixel decoder; AIM v1's head predicts without the
  decoder AIMv2 draws with): for the others the predictions figure is left out, saying so.
- Losses: ``metrics.csv`` (train and validation) with the baselines of ``summary.json``; a panel per loss part the
  run logged.
- Experts (MoE encoders): ``moe.csv``, each expert's share of its block's routed tokens at every logging step, as
  one heat map (a row per block and expert, a column per logged step): an expert that starves or takes everything
  shows as a dark or bright band.
- Attention: the exported encoder (any objective's; full attention), last block, softmax(q k^T / sqrt(d))
  averaged over heads: where chosen query patches look, and how much attention each patch receives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from aimpre.config import Config, short
from aimpre.data import Augment, ImageTextStream, build_tokenizer, sources, spec_urls
from aimpre.data.shardset import starts_process
from aimpre.export import read_run, run_encoder, run_model
from aimpre.files import atomic_path, file_present, read_csv, read_json_object, regular_file
from aimpre.model import AIMv2, AIMv2Encoder, patchify, unpatchify
from aimpre.model.layers import Block
from aimpre.scaling.plots import DPI  # one resolution for every figure aimpre draws


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _to_pixels(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Normalised [B, 3, H, W] -> displayable [B, H, W, 3] in 0..1."""
    return (x * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def denormalize_predictions(pred: Tensor, images: Tensor, patch: int, prefix: int) -> Tensor:
    """Next-patch predictions drawn as images [B, 3, H, W] (normalised-image space).

    Args:
        pred: [B, N-1, P] pixel-head output; ``pred[:, i]`` is patch i+1, standardised over its own P values.
        images: the normalised input images [B, 3, H, W].
        patch: patch size.
        prefix: prefix length M: patches 0..M-1 (not targets) are copied from ``images``.
    """
    target = patchify(images, patch)  # [B, N, P], N = rows x cols of any grid (a sincos2d model's non-square)
    mean = target.mean(-1, keepdim=True)
    std = (target.var(-1, keepdim=True) + 1e-6).sqrt()  # what ``normalize_patches`` divided the target by
    out = target.clone()
    out[:, 1:] = pred * std[:, 1:] + mean[:, 1:]
    out[:, :prefix] = target[:, :prefix]
    return unpatchify(out, patch, grid=(images.shape[-2] // patch, images.shape[-1] // patch))


@torch.no_grad()
def predicted_images(model: AIMv2, images: Tensor, text: Tensor, prefix: int) -> Tensor:
    """The model's next-patch predictions for normalised ``images`` with a prefix of M patches, as images.

    Args:
        model: the pretraining model (encoder, decoder, pixel head).
        images: normalised images [B, 3, H, W].
        text: caption ids [B, L] (pixel predictions precede the text in the causal decoder: they do not see it).
        prefix: prefix length M.
    """
    prefix_len = torch.full((images.shape[0],), prefix, dtype=torch.long)
    pred, _ = model.predict(images, text, prefix_len)  # [B, N-1, P]
    return denormalize_predictions(pred, images, model.cfg.patch_size, prefix)


def plot_predictions(model: AIMv2, batch: dict[str, Any], mean: Tensor, std: Tensor, prefix: int) -> Figure:
    """Originals above the model's next-patch predictions.

    Args:
        model: the pretraining model.
        batch: a pipeline batch (``image`` uint8 [B, 3, H, W], any grid the model runs; ``text`` ids).
        mean, std: the data normalisation, [1, 3, 1, 1] in 0..1 units.
        prefix: prefix length M (the first M patches are input, drawn faded).
    """
    images = (batch["image"].float() / 255 - mean) / std
    pred = predicted_images(model, images, batch["text"], prefix)
    orig, shown = _to_pixels(images, mean, std), _to_pixels(pred, mean, std)
    p = model.cfg.patch_size
    H, W = images.shape[-2:]
    gw = W // p  # patches per row: raster order runs along rows of the images' own grid
    rows = prefix // gw  # fade the prefix (whole rows, plus the part of the next one)
    fade = torch.zeros(H, W, 1)
    fade[: rows * p] = 1
    fade[rows * p : (rows + 1) * p, : (prefix % gw) * p] = 1
    shown = shown * (1 - 0.6 * fade) + 0.6 * fade  # blend the prefix towards white
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n, 4.4), squeeze=False, layout="constrained")
    for i in range(n):
        for row, img in enumerate((orig, shown)):
            axes[row, i].imshow(img[i].numpy())
            axes[row, i].set_axis_off()
    axes[0, 0].set_title("original", loc="left", fontsize=9)
    axes[1, 0].set_title(f"prediction (first {prefix} patches = prefix, faded)", loc="left", fontsize=9)
    fig.suptitle(
        "Next-patch predictions, teacher-forced, raster order. The model predicts each patch standardised by its "
        "own mean and std over all its RGB values, so it never predicts a patch's brightness, contrast or colour "
        "saturation: per-patch normalisation drops colour. Each prediction is drawn with its target patch's "
        "mean/std, so the colours shown are borrowed from the original.",
        fontsize=10,
        wrap=True,
    )
    return fig


def plot_losses(metrics: Path, summary: Path | None = None) -> Figure:
    """Train and validation losses (log scale) by step.

    Args:
        metrics: a run's ``metrics.csv``.
        summary: its ``summary.json``, for the mean-patch and bigram baselines (optional).
    """
    rows = read_csv(metrics, "metrics file")
    if not rows:
        raise ValueError(f"{metrics} has no rows")
    base = read_json_object(summary, "run summary").get("baselines", {}) if summary and summary.is_file() else {}
    baselines = {
        "loss_image": ("loss_image_mean_patch", "mean-patch baseline"),
        "loss_text": ("loss_text_bigram", "bigram baseline"),
    }
    keys = [k for k in ("loss", "loss_image", "loss_text") if any(r.get(k) or r.get("val_" + k) for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(13 * len(keys) / 3, 3.8), layout="constrained", squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for prefix, style in (("", "-"), ("val_", "o--")):
            pts = [(int(r["step"]), float(r[prefix + key])) for r in rows if r.get(prefix + key)]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label="validation" if prefix else "train", markersize=4)
        if key in baselines and baselines[key][0] in base:
            ax.axhline(base[baselines[key][0]], color="gray", ls=":", label=baselines[key][1])
        ax.set(title=key, xlabel="step", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"losses: {metrics}", fontsize=10)
    return fig


def plot_expert_share(moe_csv: Path) -> Figure:
    """Each MoE block's expert shares of the routed tokens over the logged steps, as a heat map.

    Args:
        moe_csv: a run's ``moe.csv`` (``step, block, expert, share`` rows, as the trainer writes it).
    """
    shares: dict[tuple[int, int], dict[int, float]] = {}
    try:
        for r in read_csv(moe_csv, "MoE metrics file"):
            shares.setdefault((int(r["block"]), int(r["expert"])), {})[int(r["step"])] = float(r["share"])
    except (KeyError, TypeError, ValueError) as e:  # a missing column (None) or a field that is not a number
        raise ValueError(f"{moe_csv}: not a moe.csv of step, block, expert, share numbers ({e})") from None
    if not shares:
        raise ValueError(f"{moe_csv} has no rows")
    rows = sorted(shares)
    steps = sorted({s for per in shares.values() for s in per})
    grid = [[shares[k].get(s, float("nan")) for s in steps] for k in rows]  # a step a row lacks stays blank
    fig, ax = plt.subplots(figsize=(max(6.0, min(14.0, 0.15 * len(steps) + 4)), 1.2 + 0.25 * len(rows)),
                           layout="constrained")  # fmt: skip
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest",
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, len(rows) - 0.5, -0.5))  # fmt: skip
    ax.set_yticks(range(len(rows)), [f"block {b} expert {e}" for b, e in rows], fontsize=7)
    ax.set_xlabel("step")
    fig.colorbar(im, ax=ax, label="share of routed tokens")
    experts = len({e for _, e in rows})
    ax.set_title(f"MoE expert shares per block (balanced: {1 / experts:.3g} each): {moe_csv}", fontsize=9)
    return fig


@torch.no_grad()
def attention_maps(encoder: AIMv2Encoder, images: Tensor) -> Tensor:
    """Last-block attention of the encoder with full attention, mean over heads: [B, N(queries), N(keys)]."""
    seen: list[Tensor] = []
    block = encoder.blocks[-1]
    assert isinstance(block, Block)
    hook = block.attn.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        encoder(images)
    finally:
        hook.remove()
    x = seen[0]  # the last block's normalised input [B, N, C]
    B, N, C = x.shape
    H = block.attn.heads
    q, k, _ = block.attn.qkv(x).view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, D]
    weights = (q @ k.transpose(-1, -2) * (C // H) ** -0.5).softmax(-1)  # [B, H, N, N]
    return weights.mean(1)


def plot_attention(encoder: AIMv2Encoder, images_u8: Tensor, mean: Tensor, std: Tensor) -> Figure:
    """Per image: where three query patches attend in the last block, and the attention each patch receives.

    Args:
        encoder: the exported encoder.
        images_u8: uint8 images [B, 3, H, W] (a non-square grid for a sincos2d encoder).
        mean, std: the normalisation it was trained with, [1, 3, 1, 1] in 0..1 units.
    """
    p = encoder.cfg.patch_size
    gh, gw = images_u8.shape[-2] // p, images_u8.shape[-1] // p  # the images' grid, not the config's square
    images = (images_u8.float() / 255 - mean) / std
    attn = attention_maps(encoder, images)  # [B, N, N]
    queries = {"centre": (gh // 2) * gw + gw // 2, "top left": 0, "bottom right": gh * gw - 1}  # patch indices
    n = len(images)
    fig, axes = plt.subplots(n, 2 + len(queries), figsize=(2.2 * (2 + len(queries)), 2.2 * n), squeeze=False,
                             layout="constrained")  # fmt: skip
    pixels = _to_pixels(images, mean, std)
    up = lambda m: m.view(gh, gw).repeat_interleave(p, 0).repeat_interleave(p, 1).numpy()  # [N] -> [H, W]
    for i in range(n):
        axes[i, 0].imshow(pixels[i].numpy())
        gray = pixels[i].mean(-1).numpy()  # heat over a grey copy: image colours would mix with the colour map
        for j, (name, qi) in enumerate(queries.items(), start=1):
            axes[i, j].imshow(gray, cmap="gray", vmin=0, vmax=1)
            axes[i, j].imshow(up(attn[i, qi]), cmap="inferno", alpha=0.6)
            r, c = divmod(qi, gw)
            axes[i, j].add_patch(Rectangle((c * p - 0.5, r * p - 0.5), p, p, fill=False, ec="cyan", lw=1.5))
            axes[0, j].set_title(f"query: {name}", fontsize=9)
        axes[i, -1].imshow(up(attn[i].mean(0)), cmap="inferno")
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, -1].set_title("received, mean of queries", fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(
        "Encoder attention, last block, full attention, mean over heads (brighter = more; query patch boxed)",
        fontsize=10,
    )
    return fig


def saved_shards(cfg: Config, cfg_file: Path) -> str | list[str]:
    """The shards a run's saved config names for drawing images from (its validation shards, else its training
    shards), if reading them starts no process.

    A run directory may come from anyone: its ``config.yaml`` is not the user's own config, so a ``pipe:`` command
    or a remote URL in it (which webdataset opens by running a shell, curl or gsutil) is refused, naming the key,
    as is a shard that is not a regular file (a FIFO would block the read forever). Shards given explicitly
    (``--data``) are the user's and are honoured whatever their kind.

    Args:
        cfg: the run's config, as read from ``cfg_file``.
        cfg_file: the run's ``config.yaml``, for messages.
    """
    key = "data.val_shards" if cfg.data.val_shards else "data.train_shards"
    spec = cfg.data.val_shards or cfg.data.train_shards
    for s in spec if isinstance(spec, list) else [spec]:
        for url in spec_urls(s, "val"):
            if starts_process(url):
                raise ValueError(
                    f"{cfg_file}: {key} names {short(url)}, which would start a process (a pipe: command or a "
                    f"remote URL): a saved run config is not trusted to run commands; pass the shards with --data"
                )
            regular_file(url, f"{cfg_file}: {key}: shard")
    return spec


def visualize(
    run: str | Path,
    out: str | Path | None = None,
    n: int = 6,
    data: str | None = None,
    img_size: int | tuple[int, int] | None = None,
) -> list[Path]:
    """Writes ``predictions.png``, ``losses.png``, ``attention.png`` and (MoE encoders) ``experts.png`` for a run.

    Args:
        run: the run directory.
        out: the output directory (default ``RUN/figures``).
        n: images per figure.
        data: shard spec of the images to show (default: the run's validation shards, if they are local files:
            see ``saved_shards``).
        img_size: draw at S or (H, W) pixels (a sincos2d run draws any grid: the centre H x W of the centre
            square, as ``aimpre probe --img-size``); None: the run's ``model.img_size``.
    """
    from aimpre.probe import check_size  # the same size checks and one-line messages as the probe

    run = Path(run)
    ckpt = read_run(run)
    cfg = ckpt.cfg
    spec = data or saved_shards(cfg, ckpt.path.parent.parent / "config.yaml")
    # built on the meta device and checked against the checkpoint before any allocation
    model = run_model(ckpt) if cfg.model.objective == "aimv2" else None
    encoder = model.encoder if model is not None else run_encoder(ckpt)
    h, w = (cfg.model.img_size,) * 2 if img_size is None else (img_size,) * 2 if isinstance(img_size, int) else img_size
    check_size(encoder, (h, w))
    tok = build_tokenizer(cfg.data.tokenizer, cfg.data.lowercase)
    shards = sources(spec, "val", need_counts=True, index=cfg.data.index)
    stream = ImageTextStream(shards, tok, cfg.model.text_len, n, Augment(max(h, w), train=False), shuffle=0)
    batch = next(iter(stream))
    top, left = (max(h, w) - h) // 2, (max(h, w) - w) // 2
    batch["image"] = batch["image"][..., top : top + h, left : left + w]  # [B, 3, S, S] -> [B, 3, H, W], the centre
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (cfg.data.mean, cfg.data.std))
    out = Path(out) if out else run / "figures"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if model is not None:
        prefix = (h // cfg.model.patch_size) * (w // cfg.model.patch_size) // 4
        written.append(_save(plot_predictions(model, batch, mean, std, prefix), out / "predictions.png"))
    else:
        print(f"no predictions.png: a {cfg.model.objective} run has no AIMv2 decoder to predict patches with")
    if file_present(run / "metrics.csv", "metrics file"):
        written.append(_save(plot_losses(run / "metrics.csv", run / "summary.json"), out / "losses.png"))
    if file_present(run / "moe.csv", "MoE metrics file"):
        written.append(_save(plot_expert_share(run / "moe.csv"), out / "experts.png"))
    # the encoder as exported: the same module, run without a prefix (full attention), as downstream tools run it
    written.append(_save(plot_attention(encoder, batch["image"][: min(n, 4)], mean, std), out / "attention.png"))
    return written
