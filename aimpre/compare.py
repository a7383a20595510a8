"""``aimpre compare``: which pretraining objective gives the better encoder for the same compute?

Trains the same encoder once per objective on the same data for the same training FLOPs (each objective's FLOPs per
sample from ``aimpre.scaling.flops``, so an objective with a cheaper head trains on more samples), then judges every
encoder the same way: attentive and linear probes on held-out labelled images, one per probe seed, and zero-shot
top-1 for the contrastive objectives (their own text tower) and, through LiT (a text tower trained against the
frozen encoder, ``aimpre.lit``), for the others. LiT's training is evaluation cost, not counted in the budget. Two
last rows are the baselines: the same encoder architecture at its random initialisation (the floor pretraining has
to beat) and the linear probe trained on raw normalised pixels (``aimpre.probe.raw_pixel_probe``: what the images
hold without any encoder; no attentive probe there). Every probe cell carries the probe's top-1 on its own training
images too: low there means the features lost what the labels need, high there and low on the test set means the
head overfits.

Everything lands in one folder and is reused when present, so an interrupted comparison continues where it stopped:
``runs/OBJECTIVE`` (a normal run; an unfinished one resumes), ``probe-<digest>.json`` per seed in each run (as
``scaling collect --probe`` keeps them; the random-init ones in the first run), ``raw-pixels-<digest>.json`` per
seed, ``lit/OBJECTIVE``,
``zero-shot-OBJECTIVE.json``, then ``compare.json``, ``compare.md`` (the table) and ``compare.png`` (bar chart).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aimpre.compare_tasks import (
    ATTRS,
    LOC_METRICS,
    PICTURE_FREE,
    SCENE_TASKS,
    TASKS,
    EvalSettings,
    Row,
    cell,
    headline,
    mean_std,
    scene_tasks,
    versus_random,
)
from aimpre.config import Config, ConfigError, load_config
from aimpre.data import build_tokenizer
from aimpre.files import atomic_path, read_json_object, write_text
from aimpre.model.sizes import OBJECTIVES

CONTRASTIVE = ("siglip", "clip")
PROBE_TRAIN, PROBE_TEST = "demo:digits-train", "demo:digits-test"
BASELINES = ("random init", "raw pixels")  # the rows that are not a pretrained encoder

# Each objective's departures from the shared config (AIMv2's recipe: lr 1e-3, batch 32 on the demo, crop scale
# 0.4-1 and flips), where the shared recipe is the reason it trains a worse encoder. The user's overrides come after
# these and win; ``plan(recipes=False)`` (``compare --shared-recipe``) leaves them out.
# - lr 3e-4 (contrastive and classification): issue 19's investigation on the demo, attentive digit probe at the
#   same budget: classification 46.9 at lr 1e-3, 79.4 at 3e-4; SigLIP 81.4 at 3e-4 and batch 64 against 41-67 for
#   the contrastive and classification rows at the shared 1e-3 / 32.
# - batch 64 (contrastive): each pair's negatives are the rest of the batch, so the losses want big batches (SigLIP
#   and CLIP train at 32k); 64 is what issue 19 measured above. At equal FLOPs it halves the steps.
# - crop scale 0.9-1, no flips (contrastive): open_clip's training transform (``AugmentationCfg.scale`` (0.9, 1.0),
#   no flip); big_vision's SigLIP recipe does not crop at all. A caption names what is in the frame: a 0.4 crop of
#   an upscaled 8x8 digit can cut the digit off, and a mirrored digit is not the digit its caption names.
# - crop scale 0.9-1, no flips (classification): the same reasons for its labels (a digit; a scene's top-most
#   shape, which a 0.4 crop can cut out: ``aimpre.data.demo``).
_LABEL_SAFE_AUG = ("data.crop_scale=[0.9,1.0]", "data.hflip=false")
RECIPES: dict[str, tuple[str, ...]] = {
    "siglip": ("optim.lr=3e-4", "data.batch_size=64", *_LABEL_SAFE_AUG),
    "clip": ("optim.lr=3e-4", "data.batch_size=64", *_LABEL_SAFE_AUG),
    "classification": ("optim.lr=3e-4", *_LABEL_SAFE_AUG),
}

# Rows that are not an objective of their own: a name -> (its objective, its overrides). aimv2-moe is AIMv2 with
# MoE encoder blocks as ml-l3m's configs/aimv2/002_aimv2_moe_hfdata.yaml (4 experts, top-1; model.moe_* defaults);
# at equal compute its FLOPs are the routed tokens' (active), so it trains about as many samples as dense aimv2.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {"aimv2-moe": ("aimv2", ("model.moe_experts=4",))}
ROWS = (*OBJECTIVES, *VARIANTS)
DISTILLED = ("distill", "aimv2_distill")  # the rows that need --teacher; their FLOPs count the teacher's forward


@dataclass(frozen=True)
class Planned:
    """One objective's run at the shared budget."""

    objective: str
    cfg: Config
    flops_per_sample: float
    steps: int

    @property
    def samples(self) -> int:
        return self.steps * self.cfg.data.batch_size

    @property
    def flops(self) -> float:
        return self.samples * self.flops_per_sample

    @property
    def run(self) -> Path:
        """The run's folder."""
        return Path(self.cfg.run.out_dir) / str(self.cfg.run.name)


def _classes_of(spec: str | list[str]) -> int | None:
    """How many classes the train shards name beside them (index.json's split classes or classes.txt; as LiT
    reads them); None if they name none."""
    from aimpre.data import spec_urls
    from aimpre.lit import LitError, class_names

    first = spec[0] if isinstance(spec, list) else spec
    try:
        return len(class_names(spec_urls(first, "pretrain")))
    except LitError:
        return None


def plan(
    objectives: tuple[str, ...],
    config: str | None = None,
    overrides: tuple[str, ...] = (),
    flops: float | None = None,
    reference_steps: int | None = None,
    out: Path = Path("compare"),
    recipes: bool = True,
    teacher: str | None = None,
) -> list[Planned]:
    """Each objective's config and step count for one training-FLOP budget.

    Args:
        objectives: names from ``OBJECTIVES``.
        config, overrides: the shared base config (default: the demo job, ``tiny``).
        flops: the budget in training FLOPs; default: what aimv2 costs in ``reference_steps`` (default the config's
            ``trainer.max_steps``).
        reference_steps: see ``flops``.
        out: the comparison folder; runs go to ``out/runs/OBJECTIVE``.
        recipes: apply each objective's ``RECIPES`` before ``overrides`` (False: the shared config for all).
        teacher: the distilled rows' (``DISTILLED``) teacher, as ``model.distill_teacher``.
    """
    from aimpre.scaling.flops import flops_per_sample

    bad = [o for o in objectives if o not in ROWS]
    if bad or not objectives:
        raise ConfigError(f"--objectives: {', '.join(bad) or 'none given'}; choose from {', '.join(ROWS)}")
    if teacher is None and any(o in DISTILLED for o in objectives):
        raise ConfigError("--teacher: the distilled rows need a teacher encoder (a run, checkpoint or export)")
    if len(set(objectives)) != len(objectives):
        raise ConfigError(f"--objectives names one twice: {', '.join(objectives)}")
    if any(o.startswith(("model.objective=", "trainer.max_steps=", "run.name=", "run.out_dir=")) for o in overrides):
        raise ConfigError("compare sets model.objective, trainer.max_steps, run.name and run.out_dir itself")

    shared = load_config(config, list(overrides))
    classes = []
    if "classification" in objectives and shared.model.num_classes is None:
        n = _classes_of(shared.data.train_shards)
        if n is None:
            raise ConfigError("config key 'model.num_classes': set it for the classification run "
                              "(the train shards' index.json names no classes)")  # fmt: skip
        classes = [f"model.num_classes={n}"]

    def config_of(row: str, steps: int) -> Config:
        objective, variant = VARIANTS.get(row, (row, ()))
        if row in DISTILLED:
            variant = (f"model.distill_teacher={teacher}",)
        extra = [f"model.objective={objective}", f"trainer.max_steps={steps}", f"run.name={row}",
                 f"run.out_dir={out / 'runs'}", *variant]  # fmt: skip
        recipe = RECIPES.get(objective, ()) if recipes else ()
        cfg = load_config(config, [*recipe, *overrides, *extra, *(classes if objective == "classification" else [])])
        vocab = cfg.model.vocab_size or build_tokenizer(cfg.data.tokenizer, cfg.data.lowercase).vocab_size
        return replace(cfg, model=replace(cfg.model, vocab_size=vocab))

    def per_step(cfg: Config) -> int:  # samples per optimiser step: recipes may change the batch
        return cfg.data.batch_size * cfg.trainer.accumulate_grad_batches

    if flops is None:
        base = config_of("aimv2", 1)
        ref = reference_steps or shared.trainer.max_steps
        flops = ref * per_step(base) * flops_per_sample(base.model)
    rows = []
    for o in objectives:
        cfg = config_of(o, 1)
        fps = flops_per_sample(cfg.model)
        steps = max(1, round(flops / (fps * per_step(cfg))))
        rows.append(Planned(o, config_of(o, steps), fps, steps))
    return rows


def _json(path: Path) -> dict[str, Any] | None:
    return read_json_object(path, "compare record") if path.is_file() else None


def _train(p: Planned) -> Path:
    from aimpre.scaling.collect import finished
    from aimpre.train.run import train

    if finished(p.run):
        return p.run
    return train(p.cfg, resume=(p.run / "checkpoints" / "last.ckpt").exists())


def _probe(
    p: Planned, seeds: tuple[int, ...], train: str, test: str, probe: dict[str, Any], random_init: bool = False
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Probe top-1 per kind over ``seeds`` on the test set and on the probe's training set, cached in the run as
    ``scaling collect --probe`` caches it; ``random_init``: of the run's architecture at its random initialisation
    instead (the floor every pretrained encoder must beat)."""
    from aimpre.probe import KINDS
    from aimpre.scaling.collect import Probe, probe_row

    top1: dict[str, list[float]] = {k: [] for k in KINDS}
    train_top1: dict[str, list[float]] = {k: [] for k in KINDS}
    for s in seeds:
        columns, _ = probe_row(p.run, Probe(train, test, {**probe, "seed": s}), p.steps, random_init)
        for k in KINDS:
            top1[k].append(columns[f"probe_{k}_top1"])
            train_top1[k].append(columns[f"probe_{k}_train_top1"])
    return top1, train_top1


def _raw_pixels(
    p: Planned, seeds: tuple[int, ...], train: str, test: str, probe: dict[str, Any], out: Path
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """The linear probe on raw normalised pixels at ``p``'s encoder's resolution, per seed, cached in ``out``
    (the attentive lists stay empty)."""
    import hashlib

    from aimpre.export import load
    from aimpre.probe import KINDS, ProbeSettings, raw_pixel_probe

    top1: dict[str, list[float]] = {k: [] for k in KINDS}
    train_top1: dict[str, list[float]] = {k: [] for k in KINDS}
    loaded = None
    for seed in seeds:
        settings = ProbeSettings(**{**probe, "seed": seed})
        m, d = p.cfg.model, p.cfg.data
        key = {"train": train, "test": test, "settings": vars(settings), "img_size": m.img_size,
               "mean": list(d.mean), "std": list(d.std)}  # fmt: skip
        path = out / f"raw-pixels-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"
        if (res := _json(path)) is None:
            loaded = loaded or load(p.run)
            res = raw_pixel_probe(loaded.info["preprocessing"], train, test, settings)
            write_text(path, json.dumps(res, indent=2) + "\n")
        for k in res:
            top1[k].append(res[k]["top1"])
            train_top1[k].append(res[k]["train_top1"])
    return top1, train_top1


def _zero_shot(p: Planned, run: Path, out: Path, lit: dict[str, Any] | None, test: str) -> dict[str, Any] | None:
    """Zero-shot top-1 on ``test``: a contrastive run through its own text tower, another through LiT (``lit``:
    ``shards`` and ``steps`` of its training; None: no LiT)."""
    from aimpre.lit import LitSettings, train_lit, zero_shot

    path = out / f"zero-shot-{p.objective}.json"
    if (res := _json(path)) is not None and res.get("shards") == test and res.get("lit") == lit:
        return res
    if p.objective in CONTRASTIVE:
        model, how = run, "own text tower"
    elif lit is not None:
        model, how = out / "lit" / p.objective, "LiT"
        if model.exists():  # a LiT folder from an earlier call trained with other settings
            shutil.rmtree(model)
        train_lit(run, model, lit["shards"], LitSettings(steps=lit["steps"], batch_size=64))
    else:
        return None
    res = {**zero_shot(model, test), "via": how, "shards": test, "lit": lit}
    write_text(path, json.dumps(res, indent=2) + "\n")
    return res


def _final_loss(run: Path) -> float | None:
    summary = _json(run / "summary.json") or {}
    return summary.get("final", {}).get("loss")


def compare(
    planned: list[Planned],
    out: Path,
    seeds: tuple[int, ...] = (0, 1, 2),
    lit: dict[str, Any] | None = None,
    probe_train: str = PROBE_TRAIN,
    probe_test: str = PROBE_TEST,
    probe: dict[str, Any] | None = None,
    tasks: tuple[str, ...] = TASKS,
    evals: EvalSettings | None = None,
) -> dict[str, Any]:
    """Trains every planned run and judges it on ``tasks`` (reusing what ``out`` holds); writes the results.

    ``lit``: LiT for the non-contrastive encoders, ``{"shards": SPEC, "steps": N}``; None: none.
    ``probe``: ``ProbeSettings`` fields other than the seed (default: its defaults).
    ``tasks``: which of ``aimpre.compare_tasks.TASKS``; ``evals``: the scene probes' budget (default: its defaults).
    """
    start = time.time()
    evals = evals or EvalSettings()
    rows = []
    no_probe: dict[str, list[float]] = {"attentive": [], "linear": []}
    for p in planned:
        t0 = time.time()
        run = _train(p)
        probes, probes_train = no_probe, no_probe
        if "digits" in tasks:
            probes, probes_train = _probe(p, seeds, probe_train, probe_test, probe or {})
        zs = _zero_shot(p, run, out, lit, probe_test) if "zero-shot" in tasks else None
        summary = _json(run / "summary.json") or {}
        rows.append({
            "objective": p.objective, "img_size": p.cfg.model.img_size, "steps": p.steps, "samples": p.samples,
            "flops_per_sample": p.flops_per_sample,
            "flops": p.flops, "params_encoder": summary.get("params", {}).get("encoder"),
            "final_loss": _final_loss(run), "train_wall_s": summary.get("wall_time_s"),
            "probe_top1": probes, "probe_train_top1": probes_train,
            "zero_shot_top1": None if zs is None else zs["top1"],
            "zero_shot_via": None if zs is None else zs["via"],
            "zero_shot_warnings": None if zs is None else zs.get("warnings", []), "seconds": round(time.time() - t0, 1),
        })  # fmt: skip
    if planned:  # the same encoder architecture untrained, and no encoder at all: what pretraining has to beat
        for name, params in (("random init", rows[0]["params_encoder"]), ("raw pixels", 0)):
            t0 = time.time()
            if "digits" not in tasks:
                top1, train_top1 = no_probe, no_probe
            elif name == "random init":
                top1, train_top1 = _probe(planned[0], seeds, probe_train, probe_test, probe or {}, random_init=True)
            else:
                top1, train_top1 = _raw_pixels(planned[0], seeds, probe_train, probe_test, probe or {}, out)
            rows.append({
                "objective": name, "steps": 0, "samples": 0, "flops_per_sample": 0.0, "flops": 0.0,
                "params_encoder": params, "final_loss": None, "train_wall_s": 0.0, "probe_top1": top1,
                "probe_train_top1": train_top1, "zero_shot_top1": None, "zero_shot_via": None,
                "seconds": round(time.time() - t0, 1),
            })  # fmt: skip
    scene = {}
    if planned and any(t in tasks for t in SCENE_TASKS):
        m = planned[0].cfg.model
        scene = scene_tasks(_scene_rows(planned), out, m.img_size, m.img_size // m.patch_size, evals, tasks)
    res = {
        "rows": rows,
        "tasks": list(tasks),
        "scene_tasks": scene,
        "eval_settings": asdict(evals),
        "seeds": list(seeds),
        # the resolution every run trained and was probed at (compare --img-size, or model.img_size)
        "img_size": planned[0].cfg.model.img_size if planned else None,
        "probe": {"train": probe_train, "test": probe_test},
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.time() - start, 1),
    }
    write_text(out / "compare.json", json.dumps(res, indent=2) + "\n")
    write_text(out / "compare.md", format_table(res) + "\n")
    plot(res, out / "compare.png")
    if scene:
        plot_tasks(res, out / "compare-tasks.png")
    return res


def _scene_rows(planned: list[Planned]) -> list[Row]:
    """The scene probes' rows: each trained encoder, then its architecture at random init and the raw pixels."""
    from aimpre.eval.scenes import judged_encoders

    def tokens(run: Path, which: str) -> Any:
        def make() -> Any:  # loaded only when some result is missing
            return judged_encoders(run, 0, random_init=which == "random_init", pixels=which == "pixels").tokens[which]

        return make

    first = planned[0]
    d = first.cfg.data
    rows = [Row(p.objective, {"run": str(p.run), "steps": p.steps, "model": asdict(p.cfg.model)},
                tokens(p.run, "encoder")) for p in planned]  # fmt: skip
    rows.append(Row("random init", {"random_init": 0, "model": asdict(first.cfg.model)},
                    tokens(first.run, "random_init")))  # fmt: skip
    pixels = {"pixels": first.cfg.model.patch_size, "mean": list(d.mean), "std": list(d.std)}
    rows.append(Row("raw pixels", pixels, tokens(first.run, "pixels")))
    return rows


def _cell(values: list[float], train: list[float] | None = None) -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    cell = f"{m:.1f}" if s is None else f"{m:.1f} ± {s:.1f}"
    return cell if not train else f"{cell} (train {mean_std(train)[0]:.1f})"


def warnings(res: dict[str, Any]) -> list[str]:
    """What makes the comparison's numbers mean less than they seem: the untrained architecture probing at least as
    well as every objective (nothing the probe can use was learnt: too few steps, or data unlike the probe's), per
    task; a scene task's picture-free row (majority class, mean map, text only) as good as every encoder (the probe
    reads nothing from any picture); and zero-shot results that are degenerate (``aimpre.lit.degenerate``).

    Args:
        res: ``compare``'s results (compare.json).
    """
    out = []
    trained = [r for r in res["rows"] if r["objective"] not in BASELINES]
    floor = next((r for r in res["rows"] if r["objective"] == "random init"), None)
    for kind in ("attentive", "linear"):
        if floor is None or not trained or not floor["probe_top1"][kind]:
            continue
        rand = mean_std(floor["probe_top1"][kind])[0]
        best = max(trained, key=lambda r: mean_std(r["probe_top1"][kind])[0])
        if rand >= mean_std(best["probe_top1"][kind])[0]:
            out.append(f"random init does as well as every objective on the {kind} probe ({rand:.1f}% vs the best, "
                       f"{best['objective']}, {mean_std(best['probe_top1'][kind])[0]:.1f}%): pretraining gave the "
                       "probe nothing; train longer (--steps, --flops) or on data nearer the probe's")  # fmt: skip
    for r in trained:
        for w in r.get("zero_shot_warnings") or []:
            out.append(f"{r['objective']} zero-shot: {w}")
    for task, table in (res.get("scene_tasks") or {}).items():
        score = {r["objective"]: mean_std(headline(task, r["result"]))[0] for r in table["rows"]}
        objectives = [n for n in score if n not in (*BASELINES, PICTURE_FREE[task])]
        if objectives and "random init" in score and score["random init"] >= max(score[n] for n in objectives):
            best = max(objectives, key=lambda n: score[n])
            out.append(f"random init does as well as every objective on {task} ({score['random init']:.1f} vs the "
                       f"best, {best}, {score[best]:.1f}): pretraining gave this probe nothing")  # fmt: skip
        seen = [n for n in score if n != PICTURE_FREE[task]]
        if seen and PICTURE_FREE[task] in score and score[PICTURE_FREE[task]] >= max(score[n] for n in seen):
            out.append(
                f"{task}: '{PICTURE_FREE[task]}', which never sees the picture, does as well as every row "
                f"({score[PICTURE_FREE[task]]:.1f}): the probe is too small or too short to read the tokens"
            )
    return out


def format_table(res: dict[str, Any]) -> str:
    """The comparison as a Markdown table: top-1 in %, mean ± sample std over the probe seeds (the mean alone for
    one seed), then notes and ``warnings``."""
    n = len(res["seeds"])
    lines = [
        "| objective | steps | samples | train FLOPs | final loss | attentive probe | linear probe | zero-shot |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        probes = [_cell(r["probe_top1"][k], (r.get("probe_train_top1") or {}).get(k)) for k in ("attentive", "linear")]
        zs = "-" if r["zero_shot_top1"] is None else f"{100 * r['zero_shot_top1']:.1f} ({r['zero_shot_via']})"
        if r.get("zero_shot_warnings"):
            zs += " (degenerate)"
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        flops = f"{r['flops']:.3g}" if r["flops"] else "-"
        lines.append(f"| {r['objective']} | {r['steps']} | {r['samples']} | {flops} | {loss} | "
                     f"{probes[0]} | {probes[1]} | {zs} |")  # fmt: skip
    lines.append("")
    spread = f"the mean ± std over {n} probe seeds" if n > 1 else "one probe seed (no spread: use --seeds 2 or more)"
    at = f" at {res['img_size']} px" if res.get("img_size") else ""
    lines.append(f"Top-1 (%) on {res['probe']['test']}{at}, probes trained on {res['probe']['train']}; probe columns "
                 f"are {spread}, with the mean top-1 on the probe's own training images in brackets. Raw pixels: the "
                 f"probes on the normalised pixels themselves. {res['machine']}, {res['date']}, "
                 f"{res['seconds'] / 60:.1f} min in all.")  # fmt: skip
    if not {"digits", "zero-shot"} & set(res.get("tasks", TASKS)):
        lines = []  # neither probe ran: the table would be all dashes
    elif "digits" in res.get("tasks", TASKS):
        trained = [r["objective"] for r in res["rows"] if r["objective"] not in BASELINES]
        attentive = lambda r: r["probe_top1"]["attentive"]
        line = versus_random("the digits (attentive probe)", res["rows"], trained, attentive)
        lines.extend(["", line] if line else [])
    for task, table in (res.get("scene_tasks") or {}).items():
        lines.extend(["", *_task_table(task, table, res)])
    lines.extend(f"\n**Warning:** {w}." for w in warnings(res))
    return "\n".join(lines)


_VLM_EXTRA = ("vlm_all", "vlm_new_templates", "vlm_train_all", "vlm_caption_ppl")


def _task_table(task: str, table: dict[str, Any], res: dict[str, Any]) -> list[str]:
    """One scene task's Markdown: its table (per readout for the attributes), the line against random init, and
    what it was measured on."""
    rows, st = table["rows"], table["settings"]
    scenes = f"{st['train_scenes']} held-out training scenes, scored on {st['test_scenes']} others"
    seeds = f"mean ± std over {st['seeds']} seeds" if st["seeds"] > 1 else "one seed (no spread)"
    out: list[str] = []
    if task == "attributes":
        out.append(f"### Scene attributes (top-1 %, {seeds}; probes on {scenes}, {st['epochs']} epochs)")
        for readout in st["readouts"]:
            out += [
                "",
                f"{readout} readout:",
                "",
                "| row | " + " | ".join(ATTRS) + " | mean | train mean |",
                "|---|" + "---:|" * (len(ATTRS) + 2),
            ]
            for r in rows:
                by = r["result"].get(readout) or r["result"].get("-") or {}
                cells = [cell(by[a]["top1"]) for a in ATTRS]
                mean = headline("attributes", {readout: by})
                train = [x for a in ATTRS for x in by[a]["train_top1"]]
                train_cell = f"{100 * float(np.mean(train)):.1f}" if train else "-"
                out.append(f"| {r['objective']} | " + " | ".join(cells) + f" | {cell(mean)} | {train_cell} |")
        note = ("majority: the most common training answer. mean: over the attributes; train mean: the probes' "
                "top-1 on their own training scenes.")  # fmt: skip
    elif task == "localize":
        out += [f"### Localization ({seeds}; heads on {scenes}, {st['epochs']} epochs)", "",
                "| row | patch IoU | box IoU | box IoU ≥ 0.5 (%) | regressed box IoU | train patch IoU |",
                "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in rows:
            x = r["result"]
            out.append(f"| {r['objective']} | " + " | ".join(cell(x.get(k, [])) for k in LOC_METRICS)
                       + f" | {cell(x.get('train_patch_iou', []))} |")  # fmt: skip
        note = ("IoU in %. mean: the training set's mean coverage map and box for the named shape, whatever the "
                "picture (the floor).")  # fmt: skip
    else:
        kinds = sorted({k for r in rows for k in r["result"]} - set(_VLM_EXTRA))
        out += [f"### VLM probe (exact match %, {seeds}; {st['connector']} connector, {st['steps']} steps, "
                f"{scenes} and {st['train_digits']} / {st['test_digits']} digits)", "",
                "| row | " + " | ".join(k.removeprefix("vlm_") for k in kinds)
                + " | all | new templates | train | caption ppl |", "|---|" + "---:|" * (len(kinds) + 4)]  # fmt: skip
        for r in rows:
            x = r["result"]
            cells = [cell(x.get(k, [])) for k in (*kinds, *_VLM_EXTRA[:3])] + [cell(x["vlm_caption_ppl"], 1, 2)]
            out.append(f"| {r['objective']} | " + " | ".join(cells) + " |")
        note = ("text only: the same language model never shown the picture (what the questions give away). "
                "new templates: held-out question wordings; caption ppl: per word, lower is better.")  # fmt: skip
    trained = [r["objective"] for r in rows if r["objective"] not in (*BASELINES, PICTURE_FREE[task])]
    line = versus_random(task, rows, trained, lambda r: headline(task, r["result"]))
    secs = ", ".join(f"{r['objective']} {r['seconds'] + r['tokens_s']:.0f}" for r in rows)
    out += ["", note, "", line, "", f"Seconds per row (tokens, shared by the scene tasks, + this task): {secs}."]
    return out


def plot_tasks(res: dict[str, Any], path: Path) -> Path:
    """One panel per scene task: each row's headline score (``aimpre.compare_tasks.headline``; error bars: std over
    seeds), the random-init level dashed across it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aimpre.scaling.plots import DPI

    tasks = res["scene_tasks"]
    titles = {"attributes": "scene attributes: mean top-1 (%)", "localize": "localization: patch IoU (%)",
              "vlm": "VLM probe: exact match (%)"}  # fmt: skip
    n = max(len(t["rows"]) for t in tasks.values())
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.0, 0.7 * n + 1.5) * len(tasks), 4), squeeze=False)
    for ax, (task, table) in zip(axes[0], tasks.items(), strict=True):
        stats = [mean_std(headline(task, r["result"])) for r in table["rows"]]
        names = [r["objective"] for r in table["rows"]]
        colours = ["tab:gray" if m in (*BASELINES, PICTURE_FREE[task]) else "tab:blue" for m in names]
        ax.bar(range(len(names)), [m for m, _ in stats], yerr=[sd or 0.0 for _, sd in stats], capsize=3,
               color=colours)  # fmt: skip
        if "random init" in names:
            ax.axhline(stats[names.index("random init")][0], ls="--", color="k", lw=0.8, label="random init")
            ax.legend(loc="upper right", fontsize=8, frameon=False)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title(titles[task], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Held-out scene tasks, objectives at equal training compute (grey: baselines)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)
    return path


def plot(res: dict[str, Any], path: Path) -> Path:
    """Grouped bars per objective: attentive, linear (error bars: std over seeds) and zero-shot top-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aimpre.scaling.plots import DPI

    rows = res["rows"]
    x = np.arange(len(rows))
    width = 0.27
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    for i, kind in enumerate(("attentive", "linear")):
        stats = [mean_std(r["probe_top1"][kind]) for r in rows]
        yerr = None if len(res["seeds"]) < 2 else [s or 0.0 for _, s in stats]  # no error bar from one seed
        ax.bar(x + (i - 1) * width, [m for m, _ in stats], width, yerr=yerr, capsize=3, label=f"{kind} probe")
    zs = [math.nan if r["zero_shot_top1"] is None else 100 * r["zero_shot_top1"] for r in rows]
    ax.bar(x + width, zs, width, label="zero-shot (own tower or LiT)")
    ax.set_xticks(x, [r["objective"] for r in rows])
    ax.set_ylabel(f"top-1 (%) on {res['probe']['test']}")
    ax.set_ylim(0, 112)  # headroom for the legend above the bars
    ax.set_yticks(range(0, 101, 20))
    flops = max((r["flops"] for r in rows), default=0)
    ax.set_title(f"Objectives at equal training compute ({flops:.2g} FLOPs each)")
    ax.legend(loc="upper center", ncol=3, fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)
    return path
