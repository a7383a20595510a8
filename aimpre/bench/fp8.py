"""``aimpre bench fp8``: the loss of float8 training against bf16 over the same steps, from the same weights on the
same batches, through the trainer's own code (``fp8_curves``)."""

from __future__ import annotations

import datetime
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from aimpre.bench.timing import RowsSoFar, cell, device_line, free_memory, sync, versions
from aimpre.config import Config, OptimConfig, RunConfig, TrainerConfig
from aimpre.data.tokenizer import ByteTokenizer
from aimpre.files import atomic_path, write_text
from aimpre.model import model_config
from aimpre.train.module import AIMv2Module, _seed
from aimpre.train.parallel import fp8_linears, fp8_problem

LOSS_TOLERANCE = 0.01  # |fp8 - bf16| / bf16 at every logged step


@dataclass
class LossCurves:
    """Per-step losses of both builds and their means over each logging window."""

    per_step: dict[str, list[float]]  # build -> loss at every step
    every: int
    ms_per_step: dict[str, float] = field(default_factory=dict)  # after the first steps (compilation)
    fp8_linears: tuple[int, int] = (0, 0)  # block linears in float8, left in bf16
    scenes: int = 0  # distinct training images

    def windows(self, build: str) -> tuple[list[int], list[float]]:
        return window_means(self.per_step[build], self.every)


def window_means(losses: list[float], every: int) -> tuple[list[int], list[float]]:
    """The logged steps (every ``every``-th, 1-based, and the last) and the mean loss over each window."""
    ends = list(range(every, len(losses) + 1, every))
    if losses and (not ends or ends[-1] != len(losses)):
        ends.append(len(losses))
    starts = [0, *ends[:-1]]
    return ends, [float(np.mean(losses[a:b])) for a, b in zip(starts, ends, strict=True)]


def loss_verdict(steps: list[int], bf16: list[float], fp8: list[float], tolerance: float = LOSS_TOLERANCE) -> str:
    """``fp8 loss within 1% of bf16 at every logged step: met (worst 0.42% at step 120)``; a non-finite loss
    fails."""
    pairs = zip(bf16, fp8, strict=True)
    rel = [abs(f - b) / abs(b) if math.isfinite(f) and math.isfinite(b) and b else math.inf for b, f in pairs]
    worst = max(range(len(rel)), key=lambda i: rel[i])
    ok = all(r <= tolerance for r in rel)
    return (f"fp8 loss within {tolerance:.0%} of bf16 at every logged step: {'met' if ok else 'NOT met'} "
            f"(worst {rel[worst]:.2%} at step {steps[worst]})")  # fmt: skip


def _scenes(n: int, img_size: int, text_len: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` of the demo's rendered scenes (shapes with named colours, sizes, positions) with their captions, as a
    batch: image uint8 [n, 3, S, S], text int64 [n, L] (byte tokens), text_mask bool [n, L]."""
    from aimpre.data.demo import render_scene
    from aimpre.data.tokenizer import encode_captions

    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(n):
        img, caption, _ = render_scene(rng, img_size)
        images.append(np.asarray(img).transpose(2, 0, 1))  # [S, S, 3] -> [3, S, S]
        captions.append(caption)
    text, mask = encode_captions(ByteTokenizer(), captions, text_len)
    return {"image": torch.from_numpy(np.stack(images)), "text": text, "text_mask": mask}


@dataclass(frozen=True)
class Fp8Settings:
    """What ``bench fp8`` trains, the same for both builds.

    Args:
        size: a model size.
        steps, batch, log_every: optimiser steps, images per step, steps per logged window.
        recipe: ``trainer.fp8_recipe``.
        quick: no compile (a CPU smoke run).
        seed: weights, data and prefixes.
        model: ModelConfig overrides of the size (tests shrink the tiny model further).
    """

    size: str = "large"
    steps: int = 300
    batch: int = 64
    log_every: int = 10
    recipe: str = "tensorwise"
    quick: bool = False
    seed: int = 0
    model: dict[str, Any] | None = None


def fp8_curves(s: Fp8Settings, on_window: Callable[[str, int, float], None] | None = None) -> LossCurves:
    """Trains ``size`` twice for ``steps`` steps, in bf16 and with ``trainer.precision=fp8``, from the same initial
    weights on the same batches, through the trainer's own code: AIMv2Module's model, configure_model
    (``parallelize``: per-block compile, the float8 conversion), configure_optimizers (AdamW, the recipe's warm-up
    and cosine schedule), the gradient clipping of on_before_optimizer_step, and its loss with the same prefix
    draws; bf16 autocast as Lightning's bf16-mixed.

    Args:
        s: what to train (``Fp8Settings``).
        on_window: called with (build, logged step, mean loss of its window) as each window ends (one host read
            per window), so a bench killed by a timeout has reported the windows it trained.
    """
    size, steps, batch, log_every, recipe, quick, seed = (s.size, s.steps, s.batch, s.log_every, s.recipe, s.quick,
                                                          s.seed)  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as aimpre train
    model_cfg = model_config(size, **{"vocab_size": ByteTokenizer.vocab_size, **(s.model or {})})
    base = Config(
        run=RunConfig(name="bench-fp8", seed=seed),
        model=model_cfg,
        optim=OptimConfig(warmup_steps=max(1, steps // 10)),
        trainer=TrainerConfig(max_steps=steps, compile=not quick, fp8_recipe=recipe),
    )
    n = min(steps * batch, 16384)
    data = {k: v.to(device) for k, v in _scenes(n, model_cfg.img_size, model_cfg.text_len, seed).items()}
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-steps * batch // n))])
    order = order[: steps * batch].view(steps, batch).to(device)  # the same batches for both builds
    curves = LossCurves({}, log_every, scenes=n)
    init: dict[str, torch.Tensor] | None = None
    for build in ("bf16", "fp8"):
        cfg = replace(base, trainer=replace(base.trainer, precision="fp8" if build == "fp8" else "bf16-mixed"))
        free_memory(device)
        torch.manual_seed(seed)
        module = AIMv2Module(cfg)
        if init is None:
            init = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
        module.model.load_state_dict(init)
        module.to(device)
        module.configure_model()
        if build == "fp8":
            converted, left = fp8_linears(module.model)
            curves.fp8_linears = (len(converted), len(left))
        opt_cfg = module.configure_optimizers()
        opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
        losses = []
        warm = min(10, steps // 2)
        t0 = time.perf_counter()
        for step in range(steps):
            if step == warm:
                sync(device)
                t0 = time.perf_counter()
            idx = order[step]
            batch_data = {k: v[idx] for k, v in data.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = module._losses(batch_data, _seed(seed, step, 0))  # training_step's prefix draw
            out["loss"].backward()
            module.on_before_optimizer_step(opt)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out["loss"].detach().float())
            if on_window and ((step + 1) % log_every == 0 or step + 1 == steps):
                start = (step // log_every) * log_every
                on_window(build, step + 1, torch.stack(losses[start:]).mean().item())
        sync(device)
        curves.ms_per_step[build] = (time.perf_counter() - t0) / max(1, steps - warm) * 1e3
        curves.per_step[build] = torch.stack(losses).tolist()
        print(f"bench fp8: {build} done, {curves.ms_per_step[build]:.1f} ms/step", file=sys.stderr, flush=True)
        del module, opt, sched, out
    free_memory(device)
    return curves


def plot_curves(curves: LossCurves, path: str, title: str) -> None:
    """Both builds' per-step losses (faint) and window means, and their relative difference, to a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6))
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for build, colour in (("bf16", "tab:blue"), ("fp8", "tab:orange")):
        per_step = curves.per_step[build]
        top.plot(range(1, len(per_step) + 1), per_step, color=colour, alpha=0.25, linewidth=0.8)
        steps, means = curves.windows(build)
        top.plot(steps, means, color=colour, marker="o", markersize=3, label=f"{build} (mean over {curves.every})")
    steps, b = curves.windows("bf16")
    _, f = curves.windows("fp8")
    bottom.plot(steps, [100 * (y - x) / x for x, y in zip(b, f, strict=True)], color="tab:orange", marker="o")
    bottom.axhspan(-100 * LOSS_TOLERANCE, 100 * LOSS_TOLERANCE, color="tab:green", alpha=0.15)
    bottom.axhline(0, color="gray", linewidth=0.8)
    top.set(ylabel="training loss", title=title)
    top.legend()
    bottom.set(xlabel="step", ylabel="fp8 vs bf16 (%)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def run_fp8(s: Fp8Settings, out: str | None = None, plot: str | None = None) -> str:
    """Runs ``fp8_curves``, prints and returns the markdown report (``out`` also writes it; ``plot`` draws the
    curves); ``out`` is rewritten with the windows so far as each is trained, each also appended to ``out`` with
    the suffix ``.jsonl``. Without a GPU (or with ``s.quick``) it is a smoke run of the tiny model, batch 4, at
    most 6 steps, logged every 2, without compile (float8 GEMMs run on CPU, slowly).

    Args:
        s: what to train (``Fp8Settings``; its seed and model overrides too).
        out: a markdown file for the report.
        plot: a PNG file for the loss curves.
    """
    cuda = torch.cuda.is_available() and not s.quick
    if not cuda:
        s = replace(s, size="tiny", steps=min(s.steps, 6), batch=4, log_every=2, quick=True)
    size, steps, batch, recipe = s.size, s.steps, s.batch, s.recipe
    device = torch.device("cuda" if cuda else "cpu")
    problem = fp8_problem(device)
    if problem:
        raise ValueError(f"bench fp8: {problem.removeprefix('config key ')}")
    windows: dict[int, dict[str, float]] = {}  # logged step -> build -> mean loss, as they are trained
    so_far = RowsSoFar(out, "fp8 vs bf16 training loss")

    def add(build: str, step: int, loss: float) -> None:
        windows.setdefault(step, {})[build] = loss
        table = ["| step | bf16 loss | fp8 loss |", "|---:|---:|---:|"] + [
            f"| {at} | {cell(w.get('bf16'), '.4f')} | {cell(w.get('fp8'), '.4f')} |" for at, w in windows.items()
        ]
        so_far.add([{"build": build, "step": step, "loss": loss}], "\n".join(table))

    curves = fp8_curves(s, on_window=add)
    cfg = model_config(size, **(s.model or {}))
    opt = OptimConfig(warmup_steps=max(1, steps // 10))  # as fp8_curves
    steps_b, bf16 = curves.windows("bf16")
    _, fp8 = curves.windows("fp8")
    ms = curves.ms_per_step
    head = [
        f"# fp8 vs bf16 training loss, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        "",
        device_line(
            device, "a smoke run of the tiny model (float8 GEMMs on CPU): these times say nothing about GPU speed"
        ),
        f"{versions('triton', 'torchao')}; AIMv2-{size}, {cfg.img_size} px, batch {batch}, {steps} steps, "
        f"AdamW lr {opt.lr:g} "
        f"(warm-up {opt.warmup_steps} steps, cosine to {opt.min_lr:g}), grad clip {opt.grad_clip:g}, bf16 autocast"
        f"{', compiled blocks' if cuda else ''}.",
        f"Both builds start from the same weights and train on the same batches: {curves.scenes} distinct scenes "
        "from the demo's renderer (aimpre.data.demo.render_scene: coloured shapes, their descriptions as "
        "captions, byte tokens) in a fixed order. fp8: trainer.precision=fp8, recipe "
        f"{recipe}, {curves.fp8_linears[0]} block linears in float8, {curves.fp8_linears[1]} left in bf16.",
        f"ms/step after the first steps: bf16 {ms['bf16']:.1f}, fp8 {ms['fp8']:.1f} "
        f"({ms['bf16'] / ms['fp8']:.2f}x; `aimpre bench step` is the speed benchmark).",
    ]
    table = ["| step | bf16 loss | fp8 loss | fp8 vs bf16 |", "|---:|---:|---:|---:|"]
    for at, b, f in zip(steps_b, bf16, fp8, strict=True):
        table.append(f"| {at} | {b:.4f} | {f:.4f} | {100 * (f - b) / b:+.2f}% |")
    verdict = loss_verdict(steps_b, bf16, fp8)
    if not cuda:
        verdict += " (a CPU smoke run: the target is judged on a GPU at AIMv2-L)"
    report = "\n".join([*head, "", *table, "", verdict, ""])
    print(report)
    if out:
        write_text(out, report)
    if plot:
        plot_curves(curves, plot, f"AIMv2-{size}, batch {batch}: fp8 ({recipe}) vs bf16")
    return report
