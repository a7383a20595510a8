"""aimpre compare: equal training FLOPs per objective, probes over seeds, zero-shot (own tower or LiT), reuse."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from aimpre.cli import main
from aimpre.compare import plan, warnings
from aimpre.compare_tasks import TASKS, headline, mean_std
from aimpre.data.demo import DIGIT_WORDS
from helpers import good_samples, write_tar

SMALL = (
    "data.batch_size=4", "data.num_workers=0", "data.val_shards=null", "model.depth=1", "model.dec_depth=1",
    "model.text_depth=1", "model.head_depth=1", "trainer.log_every=1", "optim.warmup_steps=1",
)  # fmt: skip


# the scene tasks at toy size: every stage runs, on a few scenes; two seeds where cheap (not the VLM)
TINY_EVAL = tuple(a for kv in ("train_scenes=16", "test_scenes=8", "train_digits=4", "test_digits=4", "attr_epochs=2",
                               "attr_seeds=2", "loc_epochs=2", "loc_seeds=2", "vlm_steps=2", "vlm_seeds=1")
                  for a in ("--eval", kv))  # fmt: skip


def test_plan_gives_every_objective_the_same_training_flops(tmp_path: Path, pretrain_spec: str) -> None:
    shards = (f"data.train_shards={pretrain_spec}", *SMALL)
    rows = plan(("aimv2", "aimv1", "siglip", "clip", "classification"), None, shards, None, 50, tmp_path)
    budget = rows[0].flops
    assert rows[0].steps == 50 and budget == 50 * 4 * rows[0].flops_per_sample
    for r in rows:
        step = r.flops_per_sample * 4  # the budget is met to the nearest step
        assert abs(r.flops - budget) <= step / 2, r.objective
        assert r.cfg.model.objective == r.objective and r.cfg.trainer.max_steps == r.steps
        assert r.cfg.run.out_dir == str(tmp_path / "runs") and r.cfg.run.name == r.objective
    by = {r.objective: r for r in rows}
    assert by["aimv1"].steps > by["aimv2"].steps  # no decoder: cheaper samples, more of them
    assert by["classification"].cfg.model.num_classes == 14  # from the demo index's class names
    assert plan(("siglip",), None, shards, 1e12, None, tmp_path)[0].steps == round(
        1e12 / (by["siglip"].flops_per_sample * 4)
    )


def _subset(src: Path, dst: Path, n: int) -> str:
    """The first ``n`` samples of a shard, as a shard of their own, with the digits' class names beside it."""
    samples: dict[str, dict] = {}
    with tarfile.open(src) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            if key not in samples and len(samples) == n:
                break
            member = tar.extractfile(m)
            assert member is not None
            samples.setdefault(key, {"__key__": key})[ext] = member.read()
    (dst.parent / "classes.txt").write_text("\n".join(DIGIT_WORDS) + "\n")
    return str(write_tar(dst, list(samples.values())))


def test_compare_trains_probes_and_zero_shots_then_reuses(tmp_path: Path, pretrain_spec: str, demo: Path) -> None:
    (tmp_path / "digits").mkdir()  # a few of the demo digits: every stage runs, on fewer images
    train = _subset(demo / "digits-train-000000.tar", tmp_path / "digits" / "train.tar", 160)
    test = _subset(demo / "digits-test-000000.tar", tmp_path / "digits" / "test.tar", 80)
    out = tmp_path / "cmp"
    args = ["compare", "--objectives", "aimv1", "siglip", "--steps", "3", "--seeds", "2", "--probe-epochs", "2",
            "--lit-steps", "5", "--lit-shards", train, "--probe-train", train, "--probe-test", test, "--out", str(out),
            *TINY_EVAL, f"data.train_shards={pretrain_spec}", *SMALL]  # fmt: skip
    assert main(args) == 0
    res = json.loads((out / "compare.json").read_text())
    rows = {r["objective"]: r for r in res["rows"]}
    assert list(rows) == ["aimv1", "siglip", "random init", "raw pixels"] and res["seeds"] == [0, 1]
    raw = rows.pop("raw pixels")  # the probes on the pixels themselves, same seeds
    assert raw["params_encoder"] == 0 and not raw["probe_top1"]["attentive"]  # a linear probe only
    assert len(raw["probe_top1"]["linear"]) == len(raw["probe_train_top1"]["linear"]) == 2
    assert "| raw pixels | 0 | 0 |" in (out / "compare.md").read_text()
    floor = rows.pop("random init")  # the untrained architecture, probed with the same seeds
    assert floor["steps"] == 0 and floor["zero_shot_top1"] is None and len(floor["probe_top1"]["linear"]) == 2
    assert floor["probe_top1"] != rows["aimv1"]["probe_top1"]
    for r in rows.values():
        assert len(r["probe_top1"]["attentive"]) == len(r["probe_top1"]["linear"]) == 2
        assert all(0 <= t <= 1 for c in ("probe_top1", "probe_train_top1") for k in ("attentive", "linear")
                   for t in r[c][k])  # fmt: skip
        summary = json.loads((out / "runs" / r["objective"] / "summary.json").read_text())
        assert summary["steps"] == r["steps"] and summary["flops"] == pytest.approx(r["flops"])
        assert 0 <= r["zero_shot_top1"] <= 1
    assert rows["siglip"]["zero_shot_via"] == "own text tower" and rows["aimv1"]["zero_shot_via"] == "LiT"
    assert (out / "lit" / "aimv1").is_dir() and not (out / "lit" / "siglip").exists()
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "compare.md").read_text()
    assert table.startswith("| objective |") and "| aimv1 |" in table and "| random init | 0 | 0 | - | - |" in table
    assert "±" in table and "mean ± std over 2 probe seeds" in table  # two seeds: a spread to show
    # three steps of training: whether random init wins is the run's to say; the warnings say it when it does
    mean = lambda r, kind: float(np.mean(np.asarray(r["probe_top1"][kind], dtype=float) * 100))  # as compare.py
    for kind in ("attentive", "linear"):
        beaten = mean(floor, kind) >= max(mean(r, kind) for r in rows.values())
        said = [w for w in warnings(res) if w.startswith(f"random init does as well as every objective on the {kind}")]
        assert len(said) == beaten and all(f"**Warning:** {w}." in table for w in said), (kind, said)
    for r in rows.values():  # a degenerate zero-shot is marked in the table and named in the warnings
        flagged = [w for w in warnings(res) if w.startswith(f"{r['objective']} zero-shot: ")]
        assert len(flagged) == len(r["zero_shot_warnings"]) and ("(degenerate)" in table) >= bool(flagged)

    _scene_tasks_reported(res, table, out)

    # a second call finds every run, probe, zero-shot and scene-task result in place and recomputes nothing
    made = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "compare.json"}
    assert len([p for p in made if p.parent.name == "eval"]) == 3 * 4 + 3  # 3 tasks x 4 rows, + picture-free rows
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in made} == made
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop(json.loads((out / "compare.json").read_text())["rows"]) == drop(res["rows"])


def _scene_tasks_reported(res: dict, table: str, out: Path) -> None:
    """Every scene task has every row (the trained ones, random init, raw pixels, its picture-free row) with a
    value per seed, a table and a line against random init in compare.md, and a panel in compare-tasks.png."""
    tasks = res["scene_tasks"]
    assert list(tasks) == ["attributes", "localize", "vlm"] and res["tasks"] == list(TASKS)
    for task, free in (("attributes", "majority"), ("localize", "mean"), ("vlm", "text only")):
        rows = {r["objective"]: r for r in tasks[task]["rows"]}
        assert list(rows) == ["aimv1", "siglip", "random init", "raw pixels", free], task
        assert rows["aimv1"]["result"] != rows["random init"]["result"]
        for name, r in rows.items():
            values = headline(task, r["result"])
            assert len(values) == (1 if task == "vlm" or name == free else 2), (task, name)
            assert all(0 <= v <= 1 for v in values) and r["seconds"] >= 0
        floor = mean_std(headline(task, rows["random init"]["result"]))[0]
        assert f"Against random init ({floor:.1f}) on {task}: " in table
        assert f"| {free} |" in table
    assert "### Scene attributes" in table and "### Localization" in table and "### VLM probe" in table
    assert "| count | shape | colour | size | row | column |" in table and "| text only |" in table
    assert "aimv1 beats it" in table or "aimv1 does not beat it" in table
    assert (out / "compare-tasks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_runs_a_subset_of_tasks(tmp_path: Path, pretrain_spec: str) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--objectives", "aimv2", "--steps", "1", "--tasks", "localize", "--out", str(out),
            *TINY_EVAL, "--eval", "loc_seeds=1", f"data.train_shards={pretrain_spec}", *SMALL]  # fmt: skip
    assert main(args) == 0
    res = json.loads((out / "compare.json").read_text())
    assert list(res["scene_tasks"]) == ["localize"] and res["eval_settings"]["loc_seeds"] == 1
    assert not res["rows"][0]["probe_top1"]["attentive"] and res["rows"][0]["zero_shot_top1"] is None
    table = (out / "compare.md").read_text()
    assert table.startswith("\n### Localization") or table.startswith("### Localization"), table[:80]
    assert "one seed (no spread)" in table and "one seed, no spread" in table
    assert not list(out.glob("runs/aimv2/probe-*.json"))  # no digit probe was run


def _exit_code(args: list[str]) -> int | str | None:
    try:
        return main(args)
    except SystemExit as e:  # argparse's refusals
        return e.code


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["model.objective=clip"], "compare sets model.objective"),
        (["--flops", "1e12", "--steps", "3"], "not allowed with argument"),
        (["--objectives", "mae"], "invalid choice"),
        (["--objectives", "clip", "clip"], "names one twice"),
        (["--eval", "vlm_steps=0"], "--eval: vlm_steps=0: must be at least 1"),
        (["--eval", "scenes=3"], "--eval: 'scenes=3' is not KEY=VALUE"),
        (["--tasks", "imagenet"], "invalid choice"),
        (["data.train_shards=/nowhere/x.tar", "--objectives", "classification"], "shard not found: /nowhere/x.tar"),
    ],
)
def test_compare_refuses_bad_input(extra: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert _exit_code(["compare", "--out", str(tmp_path / "c"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "c").exists()


def test_classification_needs_class_names_beside_unlabelled_shards(tmp_path: Path, capsys) -> None:
    shard = write_tar(tmp_path / "captions.tar", good_samples("cap", 4))  # no index.json, no classes.txt
    args = ["compare", f"data.train_shards={shard}", "--out", str(tmp_path / "c"), "--objectives", "classification"]
    assert _exit_code(args) == 2
    assert "config key 'model.num_classes'" in capsys.readouterr().err
