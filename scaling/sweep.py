"""Sweeps: a typed YAML (``Sweep``) expanded into run configs, one complete aimpre config per point.

A sweep starts from a base config (any aimpre YAML; the defaults if none) plus ``overrides`` for every point,
and names its model sizes: ``sizes: {NAME: {model fields}}`` over the base's ``model.size``. ``head_dim`` and
``mlp_ratio`` fill ``heads`` and ``mlp_hidden`` where a size gives only a width, and ``decoder: same`` gives the
decoder the encoder's width/depth/heads/MLP (AIMv2 keeps one fixed decoder: ``decoder: fixed``). Designs:

- ``grid``: every size x every sample budget (``samples``), each run with the base schedule (Chinchilla's
  Approach 1/3 protocol).
- ``isoflop``: for each compute budget in ``flops`` (training FLOPs, ``aimpre.scaling.flops``), the
  ``per_budget`` sizes nearest the expected optimum (``samples_per_param`` samples per parameter), each
  trained for C / FLOPs-per-sample samples (Approach 2).
- ``cooldown``: AIMv2's cheap protocol (after Hägele et al. 2024): one constant-lr trunk per size, and for each
  sample budget a branch that resumes the trunk's checkpoint at (1 - cooldown_fraction) of the budget and
  decays the lr linearly to ``optim.min_lr``; each branch is one data point. The trunk keeps every
  checkpoint at the branch points (``trainer.keep_last: -1``; ``ckpt_every`` is their greatest common divisor).

``plan`` writes ``OUT/configs/POINT.yaml`` (each a full config; its ``run.out_dir`` is ``OUT/runs``),
``OUT/plan.json`` (the points, in an order where every trunk precedes its branches) and ``OUT/sweep.yaml``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aimpre import files
from aimpre.config import Config, ConfigError, build_config, dump_config, load_yaml, short, to_dict
from aimpre.quoting import plain_name
from aimpre.scaling.flops import flops_per_sample, param_counts

DESIGNS = ("grid", "isoflop", "cooldown")


@dataclass
class Sweep:
    name: str = "sweep"
    design: str = "grid"  # grid | isoflop | cooldown
    base: str | None = None  # an aimpre config YAML, relative to the sweep file; None: the defaults
    overrides: dict[str, Any] = field(default_factory=dict)  # section.key: value, for every point
    sizes: dict[str, dict[str, Any]] = field(default_factory=dict)  # size name -> model fields
    head_dim: int | None = None  # heads = width // head_dim where a size gives no heads
    mlp_ratio: float | None = None  # mlp_hidden = mlp_ratio * width (rounded to 8) where a size gives none
    decoder: str = "fixed"  # fixed: the base's decoder for every size | same: the encoder's shape
    samples: list[int] = field(default_factory=list)  # grid, cooldown: sample budgets
    flops: list[float] = field(default_factory=list)  # isoflop: compute budgets (training FLOPs)
    per_budget: int = 5  # isoflop: sizes per budget
    samples_per_param: float = 20.0  # isoflop: where the expected optimum lies (D/N, N = all parameters)
    cooldown_fraction: float = 0.2  # cooldown: the share of each budget spent decaying the lr
    world_size: int = 1  # processes per run: a step sees data.batch_size * world_size * accumulation samples


@dataclass
class Point:
    name: str
    kind: str  # run | trunk | branch
    size: str
    steps: int
    samples: int
    flops: float
    params: int  # all parameters (param_counts(...)["total"])
    group: str  # points of one group run in order (a trunk, then its branches)
    branch_from: str | None = None
    branch_step: int | None = None
    cfg: Config | None = None


def _typed(value: Any, tp: Any, key: str) -> Any:
    """Checks a sweep value against its annotation (the few shapes ``Sweep`` uses)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _typed(value, next(a for a in args if a is not type(None)), key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"sweep key {key!r} must be a list, got {short(value)}")
        return [_typed(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"sweep key {key!r} must be a mapping, got {short(value)}")
        return {str(k): _typed(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, str):  # YAML reads 1e12 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    ok = (tp is float and isinstance(value, int | float)) or isinstance(value, tp)
    if not ok or (tp in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"sweep key {key!r} must be {tp.__name__}, got {short(value)}")
    return float(value) if tp is float else value


def load_sweep(path: str | Path) -> tuple[Sweep, Path]:
    """Reads and checks a sweep YAML; returns it and the folder its relative paths start from."""
    p = Path(path)
    raw = load_yaml(p, "sweep file") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {p} must hold a mapping of sweep keys")
    hints = typing.get_type_hints(Sweep)
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            hint = difflib.get_close_matches(str(key), list(hints), n=1)
            extra = f"; did you mean 'sweep.{hint[0]}'?" if hint else f"; known keys: {', '.join(hints)}"
            raise ConfigError(f"unknown sweep key {short(f'sweep.{key}')}{extra}")
        kwargs[key] = _typed(value, hints[key], f"sweep.{key}")
    sw = Sweep(**kwargs)
    _check_sweep(sw)
    return sw, p.parent


def _check_sweep(sw: Sweep) -> None:
    def check(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"sweep key 'sweep.{key}': {why}")

    try:  # the plan's folder names, its SLURM job name and its run names start from it
        plain_name(sw.name, "sweep key 'sweep.name'")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check(sw.design in DESIGNS, "design", f"{sw.design!r} is not one of {', '.join(DESIGNS)}")
    check(bool(sw.sizes), "sizes", "name at least one size")
    check(sw.decoder in ("fixed", "same"), "decoder", f"{sw.decoder!r} is not fixed or same")
    check(sw.head_dim is None or sw.head_dim > 0, "head_dim", "must be positive")
    check(sw.mlp_ratio is None or sw.mlp_ratio > 0, "mlp_ratio", "must be positive")
    check(sw.world_size > 0, "world_size", "must be positive")
    for name in sw.sizes:
        check(name.replace("_", "").replace(".", "").isalnum(), f"sizes.{name}", "use letters, digits, _ and .")
    if sw.design in ("grid", "cooldown"):
        check(bool(sw.samples) and all(s > 0 for s in sw.samples), "samples", f"{sw.design} needs positive budgets")
    if sw.design == "isoflop":
        check(bool(sw.flops) and all(c > 0 for c in sw.flops), "flops", "isoflop needs positive compute budgets")
        check(sw.per_budget >= 3, "per_budget", "a parabola needs at least 3 sizes per budget")
        check(sw.samples_per_param > 0, "samples_per_param", "must be positive")
    if sw.design == "cooldown":
        check(0 < sw.cooldown_fraction < 1, "cooldown_fraction", "must lie in (0, 1)")


def _base_raw(sw: Sweep, root: Path) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    if sw.base:
        p = Path(sw.base) if Path(sw.base).is_absolute() else root / sw.base
        if not p.is_file():
            raise ConfigError(f"sweep key 'sweep.base': config file not found: {p}")
        raw = load_yaml(p) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"sweep key 'sweep.base': config file {p} must hold a mapping of sections")
    for key, value in sw.overrides.items():
        section, _, name = key.partition(".")
        if not name or "." in name:
            raise ConfigError(f"sweep key 'sweep.overrides.{key}' must be section.key (e.g. optim.lr)")
        raw.setdefault(section, {})[name] = value
    return raw


def _with(raw: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for section, values in sections.items():
        out.setdefault(section, {}).update(values)
    return out


def size_configs(sw: Sweep, root: Path) -> dict[str, Config]:
    """The validated config of each named size (the base with the size's model fields)."""
    raw = _base_raw(sw, root)
    out = {}
    for name, spec in sw.sizes.items():
        fields = dict(spec)
        width = fields.get("width")
        if width is not None and sw.head_dim and "heads" not in fields:
            fields["heads"] = max(1, width // sw.head_dim)
        if width is not None and sw.mlp_ratio and "mlp_hidden" not in fields:
            fields["mlp_hidden"] = 8 * max(1, round(sw.mlp_ratio * width / 8))
        try:
            cfg = build_config(_with(raw, model=fields))
            if sw.decoder == "same":
                m = cfg.model
                same = {f"dec_{k}": getattr(m, k) for k in ("width", "depth", "heads", "mlp_hidden")}
                cfg = build_config(_with(raw, model={**same, **fields}))
        except ConfigError as e:
            raise ConfigError(f"sweep size {name!r}: {e}") from e
        out[name] = cfg
    return out


def _vocab(cfg: Config) -> int:
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    from aimpre.data import build_tokenizer  # the vocabulary comes from the tokenizer, as in training

    return build_tokenizer(cfg.data.tokenizer, cfg.data.lowercase).vocab_size


def _point_cfg(cfg: Config, name: str, runs: Path, optim: dict[str, Any] | None = None, **trainer: Any) -> Config:
    """``cfg`` as the run ``runs/name``, with optim and trainer fields changed (validated again)."""
    raw = to_dict(cfg)
    raw["run"].update(name=name, out_dir=str(runs))
    raw["optim"].update(optim or {})
    raw["trainer"].update(trainer)
    return build_config(raw)


def _short(x: float) -> str:
    """1e13 -> '1e13', 2.5e12 -> '2.5e12' (run names)."""
    return f"{x:.3g}".replace("e+", "e")


def plan(sw: Sweep, root: Path, out_dir: str | Path) -> list[Point]:
    """Expands a sweep into points and writes their configs and ``plan.json`` under ``out_dir``.

    Args:
        sw: the sweep.
        root: the folder the sweep's relative paths start from.
        out_dir: the plan folder (runs go to ``out_dir/runs``).
    """
    out = Path(out_dir).resolve()
    runs = out / "runs"
    sizes = size_configs(sw, root)
    info = {}
    for name, cfg in sizes.items():
        vocab = _vocab(cfg)
        t = cfg.trainer
        info[name] = (
            flops_per_sample(cfg.model, vocab),
            param_counts(cfg.model, vocab)["total"],
            cfg.data.batch_size * sw.world_size * t.accumulate_grad_batches,
        )
    points = {"grid": _grid, "isoflop": _isoflop, "cooldown": _cooldown}[sw.design](sw, sizes, info, runs)
    for p in points:
        warm = p.cfg.optim.warmup_steps if p.cfg else 0
        start = p.branch_step if p.kind == "branch" else p.steps
        if start is not None and start <= warm:
            raise ConfigError(
                f"sweep point {p.name!r}: {start} steps {'before the cooldown ' if p.kind == 'branch' else ''}"
                f"do not outlast optim.warmup_steps ({warm}); raise the budget or lower the warmup"
            )
    _write(sw, out, points)
    return points


def format_plan(points: list[Point]) -> str:
    """The plan as a table, and its cost: a branch costs only the steps after its branch point."""
    lines = [f"{'point':24}{'kind':>8}{'params':>12}{'steps':>8}{'samples':>10}{'FLOPs':>12}  from"]
    for p in points:
        src = f"{p.branch_from} @ step {p.branch_step}" if p.branch_from else ""
        lines.append(f"{p.name:24}{p.kind:>8}{p.params:>12,}{p.steps:>8}{p.samples:>10}{p.flops:>12.3g}  {src}")
    cost = sum(p.flops * (1 - (p.branch_step or 0) / p.steps) for p in points)
    lines.append(f"{len(points)} runs, {cost:.3g} training FLOPs to spend")
    return "\n".join(lines)


def _steps(samples: float, per_step: int) -> int:
    return max(1, round(samples / per_step))


def _grid(sw: Sweep, sizes: dict[str, Config], info: dict, runs: Path) -> list[Point]:
    pts = []
    for size, cfg in sizes.items():
        fps, n, per_step = info[size]
        for s in sw.samples:
            steps = _steps(s, per_step)
            name = f"{size}-s{steps * per_step}"
            c = _point_cfg(cfg, name, runs, max_steps=steps, val_every=steps, ckpt_every=steps)
            pts.append(Point(name, "run", size, steps, steps * per_step, fps * steps * per_step, n, name, cfg=c))
    return pts


def _isoflop(sw: Sweep, sizes: dict[str, Config], info: dict, runs: Path) -> list[Point]:
    order = sorted(sizes, key=lambda s: info[s][1])  # by parameters
    # the budget at which each size is expected to be optimal: C = FLOPs/sample * samples_per_param * N
    c_opt = [math.log(info[s][0] * sw.samples_per_param * info[s][1]) for s in order]
    k = min(sw.per_budget, len(order))
    pts = []
    for budget in sw.flops:
        centre = min(range(len(order)), key=lambda i: abs(c_opt[i] - math.log(budget)))
        lo = min(max(0, centre - k // 2), len(order) - k)
        for size in order[lo : lo + k]:
            fps, n, per_step = info[size]
            steps = _steps(budget / fps, per_step)
            name = f"{size}-c{_short(budget)}"
            c = _point_cfg(sizes[size], name, runs, max_steps=steps, val_every=steps, ckpt_every=steps)
            pts.append(Point(name, "run", size, steps, steps * per_step, fps * steps * per_step, n, name, cfg=c))
    return pts


def _cooldown(sw: Sweep, sizes: dict[str, Config], info: dict, runs: Path) -> list[Point]:
    pts = []
    for size, cfg in sizes.items():
        fps, n, per_step = info[size]
        budgets = sorted({_steps(s, per_step) for s in sw.samples})
        cool = [max(2, round(sw.cooldown_fraction * b)) for b in budgets]
        starts = [b - k for b, k in zip(budgets, cool, strict=True)]
        trunk, top = f"{size}-trunk", max(starts)
        if top // math.gcd(*starts) > 100:  # the trunk checkpoints every gcd steps and keeps them all
            raise ConfigError(
                f"sweep key 'sweep.samples': size {size!r} has branch points {', '.join(map(str, starts))} "
                f"(steps), gcd {math.gcd(*starts)}: the trunk would keep {top // math.gcd(*starts)} checkpoints; "
                "choose budgets whose cooldown starts share a larger factor (e.g. doubling budgets)"
            )
        constant = {"schedule": "constant", "cooldown_steps": 0}
        tc = _point_cfg(cfg, trunk, runs, constant, max_steps=top, val_every=top, ckpt_every=math.gcd(*starts),
                        keep_last=-1)  # fmt: skip
        pts.append(Point(trunk, "trunk", size, top, top * per_step, fps * top * per_step, n, trunk, cfg=tc))
        for b, k, s in zip(budgets, cool, starts, strict=True):
            name = f"{size}-s{b * per_step}"
            bc = _point_cfg(cfg, name, runs, {**constant, "cooldown_steps": k}, max_steps=b, val_every=b,
                            ckpt_every=b, keep_last=1)  # fmt: skip
            pts.append(Point(name, "branch", size, b, b * per_step, fps * b * per_step, n, trunk, trunk, s, cfg=bc))
    return pts


def _write(sw: Sweep, out: Path, points: list[Point]) -> None:
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for p in points:
        assert p.cfg is not None
        files.write_text(out / "configs" / f"{p.name}.yaml", dump_config(p.cfg))
    meta = [{k: v for k, v in dataclasses.asdict(p).items() if k != "cfg"} | {"config": f"configs/{p.name}.yaml"}
            for p in points]  # fmt: skip
    doc = {"sweep": sw.name, "design": sw.design, "runs_dir": "runs", "points": meta}
    files.write_text(out / "plan.json", json.dumps(doc, indent=2))
    files.write_text(out / "sweep.yaml", yaml.safe_dump(dataclasses.asdict(sw), sort_keys=False))


def load_plan(plan_dir: str | Path) -> dict[str, Any]:
    """Reads ``plan.json`` from a plan folder (what ``plan`` wrote), checked as ``check_plan``."""
    p = Path(plan_dir) / "plan.json"
    if not p.exists():
        raise FileNotFoundError(f"no plan.json in {plan_dir}: run `aimpre scaling plan SWEEP.yaml --out DIR` first")
    plan = files.read_json(p, "sweep plan")
    check_plan(plan, str(p))
    assert isinstance(plan, dict)  # check_plan refused anything else
    return plan


_POINT_KINDS = ("run", "trunk", "branch")


def check_plan(plan: object, where: str) -> None:
    """Refuses a plan whose names are not plain names or whose fields are not what ``plan`` writes, naming the
    field: its names become paths (``runs/NAME``, ``logs/NAME.log``) and words of the scripts ``scaling run
    --slurm`` writes, and a plan may come from anyone.

    Args:
        plan: the parsed ``plan.json``.
        where: the file, for messages.
    """

    def need(ok: bool, field: str, why: str) -> None:
        if not ok:
            raise ValueError(f"{where}: {field} {why}")

    need(isinstance(plan, dict), "the plan", "must be a JSON object")
    assert isinstance(plan, dict)
    plain_name(plan.get("sweep"), f"{where}: sweep")
    need(plan.get("design") in DESIGNS, "design", f"must be one of {', '.join(DESIGNS)}")
    plain_name(plan.get("runs_dir", "runs"), f"{where}: runs_dir")
    points = plan.get("points")
    need(isinstance(points, list) and all(isinstance(q, dict) for q in points), "points", "must be a list of objects")
    assert isinstance(points, list)
    for i, q in enumerate(points):
        at = f"{where}: points[{i}]"
        for key in ("name", "group", "size"):
            plain_name(q.get(key), f"{at}.{key}")
        need(q.get("kind") in _POINT_KINDS, f"points[{i}].kind", f"must be one of {', '.join(_POINT_KINDS)}")
        need(q.get("config") == f"configs/{q['name']}.yaml", f"points[{i}].config", f"must be configs/{q['name']}.yaml")
        need(isinstance(q.get("flops"), int | float), f"points[{i}].flops", "must be a number")
        if q["kind"] == "branch":
            plain_name(q.get("branch_from"), f"{at}.branch_from")
            step = q.get("branch_step")
            need(isinstance(step, int) and step > 0, f"points[{i}].branch_step", "must be a positive step")
