"""Sweep plans: expansion of each design into complete configs, and errors naming the sweep key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from aimpre.config import ConfigError, load_config
from aimpre.scaling import flops_per_sample, param_counts
from aimpre.scaling.runner import command_list, slurm_script
from aimpre.scaling.sweep import load_sweep, plan, size_configs
from aimpre.train.optim import lr_factor

REPO = Path(__file__).resolve().parents[1]
SIZES = {"s": {"width": 32, "depth": 1}, "m": {"width": 64, "depth": 2}, "l": {"width": 96, "depth": 2, "heads": 2}}


def _sweep(tmp_path: Path, **keys: object) -> Path:
    doc = {"name": "t", "base": str(REPO / "configs" / "tiny.yaml"), "sizes": SIZES, "head_dim": 32,
           "mlp_ratio": 2.0, "decoder": "same", "overrides": {"data.batch_size": 8, "optim.warmup_steps": 5},
           **keys}  # fmt: skip
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _plan(tmp_path: Path, **keys: object) -> tuple[list, Path]:
    sw, root = load_sweep(_sweep(tmp_path, **keys))
    return plan(sw, root, tmp_path / "plan"), tmp_path / "plan"


def test_grid_expands_sizes_times_budgets(tmp_path: Path) -> None:
    points, out = _plan(tmp_path, design="grid", samples=[80, 160])
    assert [p.name for p in points] == ["s-s80", "s-s160", "m-s80", "m-s160", "l-s80", "l-s160"]
    cfg = load_config(out / "configs" / "m-s160.yaml")  # a complete config: it loads on its own
    m = cfg.model
    assert (m.width, m.depth, m.heads, m.mlp_hidden) == (64, 2, 2, 128)  # heads from head_dim, MLP from the ratio
    assert (m.dec_width, m.dec_depth, m.dec_heads, m.dec_mlp_hidden) == (64, 2, 2, 128)  # decoder: same
    assert load_config(out / "configs" / "l-s80.yaml").model.heads == 2  # given explicitly: kept
    assert cfg.trainer.max_steps == 20 and cfg.trainer.val_every == 20 and cfg.optim.schedule == "cosine"
    assert cfg.run.name == "m-s160" and Path(cfg.run.out_dir) == (out / "runs").resolve()
    doc = json.loads((out / "plan.json").read_text())
    assert doc["design"] == "grid" and len(doc["points"]) == 6
    p = doc["points"][3]
    assert p["samples"] == 160 and p["flops"] == pytest.approx(160 * flops_per_sample(m, 258))
    assert p["params"] == param_counts(m, 258)["total"]


def test_isoflop_centres_sizes_on_the_expected_optimum(tmp_path: Path) -> None:
    widths = (16, 32, 48, 64, 96, 128, 192)
    sizes = {f"w{w}": {"width": w, "depth": 1} for w in widths}
    sw, root = load_sweep(_sweep(tmp_path, sizes=sizes, design="isoflop", flops=[1.0], samples_per_param=0.02))
    cfgs = size_configs(sw, root)
    # the budget at which each size is expected optimal: FLOPs/sample x 0.02 samples/parameter x N
    c_opt = {k: flops_per_sample(c.model, 258) * 0.02 * param_counts(c.model, 258)["total"] for k, c in cfgs.items()}
    sw.flops, sw.per_budget = [c_opt["w48"], c_opt["w128"]], 3
    points = plan(sw, root, tmp_path / "plan")
    assert [p.size for p in points] == ["w32", "w48", "w64", "w96", "w128", "w192"]  # centred where possible
    for p in points:
        budget = sw.flops[0] if p.size in ("w32", "w48", "w64") else sw.flops[1]
        assert p.flops == pytest.approx(budget, rel=0.1)  # whole steps of 8 samples
        assert load_config(tmp_path / "plan" / "configs" / f"{p.name}.yaml").trainer.max_steps == p.steps
    sw.flops = [c_opt["w192"] * 4]  # past the largest size: the window stays inside the sizes
    assert [p.size for p in plan(sw, root, tmp_path / "plan2")] == ["w96", "w128", "w192"]


def test_cooldown_plans_a_trunk_and_branches(tmp_path: Path) -> None:
    points, out = _plan(tmp_path, design="cooldown", samples=[80, 160, 320])  # 10, 20, 40 steps of 8
    s = [p for p in points if p.size == "s"]
    assert [p.kind for p in s] == ["trunk", "branch", "branch", "branch"]
    trunk, *branches = s
    assert [b.branch_step for b in branches] == [8, 16, 32] and trunk.steps == 32  # the last 20% cool down
    t = load_config(out / "configs" / "s-trunk.yaml")
    assert t.optim.schedule == "constant" and t.optim.cooldown_steps == 0
    assert t.trainer.keep_last == -1 and t.trainer.ckpt_every == 8  # a checkpoint at every branch point
    b = load_config(out / "configs" / "s-s160.yaml")
    assert b.optim.cooldown_steps == 4 and b.trainer.max_steps == 20 and b.trainer.val_every == 20
    f = lr_factor(b.optim, b.trainer.max_steps)
    assert f(15) == f(16) == 1.0 > f(17) and f(19) == pytest.approx(b.optim.min_lr / b.optim.lr)
    assert all(p.group == "s-trunk" for p in s)
    script = slurm_script(out, "torchrun --nproc_per_node 8", ("--gres=gpu:8",))
    assert "#SBATCH --array=0-2" in script and "#SBATCH --gres=gpu:8" in script
    assert '--group "${RUN_GROUPS[$SLURM_ARRAY_TASK_ID]}"' in script and "'torchrun --nproc_per_node 8'" in script
    assert len(command_list(out).splitlines()) == 3


def test_bad_sweeps_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown sweep key 'sweep.sample'; did you mean 'sweep.samples'"):
        load_sweep(_sweep(tmp_path, sample=[1]))
    with pytest.raises(ConfigError, match=r"'sweep.samples\[1\]' must be int"):
        load_sweep(_sweep(tmp_path, samples=[80, "many"]))
    with pytest.raises(ConfigError, match=r"'sweep.design'.*grid, isoflop, cooldown"):
        load_sweep(_sweep(tmp_path, design="random"))
    with pytest.raises(ConfigError, match=r"'sweep.flops'"):
        load_sweep(_sweep(tmp_path, design="isoflop"))
    with pytest.raises(ConfigError, match=r"sweep size 'm': unknown config key 'model.widht'"):
        _plan(tmp_path, design="grid", samples=[80], sizes={"m": {"widht": 64}})
    with pytest.raises(ConfigError, match=r"point 's-s16': 2 steps do not outlast optim.warmup_steps \(5\)"):
        _plan(tmp_path, design="grid", samples=[16])
    with pytest.raises(ConfigError, match=r"'sweep.samples'.*branch points 81, 160, 320.*gcd 1.*320 checkpoints"):
        _plan(tmp_path, design="cooldown", samples=[808, 1600, 3200])
    with pytest.raises(ConfigError, match=r"optim.cooldown_steps"):
        load_config(None, ["optim.cooldown_steps=5"])  # needs the constant schedule
