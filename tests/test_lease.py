"""Issue 22 (the first GPU lease returns every number), its CPU side: the plain build of `bench step` compiles to one
graph, and training steps between logging steps read nothing back from the device."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from aimpre.bench.step import plain_attention
from aimpre.model import AIMv2, model_config
from helpers import rows_when_killed

# The tiny model as `bench step` builds it for plain (torch's own fused ops), at a small image for speed.
TINY = {"vocab_size": 258, "img_size": 56, "text_len": 16, "fused": "torch"}


def test_plain_build_compiles_to_one_graph() -> None:
    """The Flex block mask is built once in the encoder's forward and handed to the blocks: a block-mask cache
    looked up in every block broke the graph there (12 graphs, 11 breaks for the tiny model before)."""
    torch.manual_seed(0)
    net = AIMv2(model_config("tiny", **TINY))
    plain_attention(net, compile=True)  # Flex in the encoder, SDPA in the decoder
    B, cfg = 2, net.cfg
    images = torch.randn(B, 3, cfg.img_size, cfg.img_size)
    text = torch.randint(2, 258, (B, cfg.text_len))
    prefix = torch.randint(1, cfg.num_patches, (B,))
    torch._dynamo.reset()
    with torch.no_grad():  # Flex has no CPU backward; the graphs Dynamo captures are the same
        explained = torch._dynamo.explain(net)(images, text, torch.ones_like(text, dtype=torch.bool), prefix)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


READBACKS = ("item", "tolist", "__float__", "__int__", "__bool__", "__array__")


class CountReadbacks(pl.Callback):
    """Counts every read of a tensor's value into Python (each one a host sync on a GPU) from the start of a training
    batch to the end of its batch hooks, on the steps that write no metrics row."""

    def __init__(self, log_every: int) -> None:
        self.log_every, self.counts, self.calls, self.saved = log_every, [], [], {}

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        step = trainer.global_step + 1  # the step this batch makes
        if step == 1 or step % self.log_every == 0:
            return
        self.counts.append(0)
        for name in READBACKS:
            original = self.saved[name] = getattr(torch.Tensor, name)

            def counted(*a: object, _original: object = original, _name: str = name, **k: object) -> object:
                frame = traceback.extract_stack(limit=2)[0]
                # torch.optim reads its step counters, which non-fused AdamW keeps on the host even on a GPU (no
                # sync; the fused AdamW the trainer uses on CUDA reads none)
                if "torch/optim/" not in frame.filename:
                    self.counts[-1] += 1
                    self.calls.append(f"{_name}: {frame.filename}:{frame.lineno}")
                return _original(*a, **k)  # type: ignore[operator]

            setattr(torch.Tensor, name, counted)

    def on_train_batch_end(self, *args: object) -> None:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)
        self.saved.clear()


@pytest.mark.parametrize("moe", [(), ("model.moe_experts=4", "model.moe_top_k=2")], ids=["dense", "moe"])
def test_no_readback_between_logging_steps(tmp_path: Path, pretrain_spec: str, moe: tuple[str, ...]) -> None:
    """A real Lightning run: the steps between logging steps read nothing back from the device, where the old code
    read about five values a step (the three losses, the gradient norm, the NaN guard's skip decision); the guard
    now skips on the device (the fused AdamW's found_inf) and checks its streak on logging steps. With MoE blocks
    too: the balance loss and the expert shares are summed on the device until a logging step."""
    from aimpre.config import load_config
    from aimpre.train import train

    cfg = load_config(None, [
        f"run.out_dir={tmp_path}", "run.name=sync", f"data.train_shards={pretrain_spec}", "data.val_shards=null",
        "data.batch_size=2", "data.num_workers=0", "model.depth=1", "model.dec_depth=1", "model.img_size=28",
        "model.text_len=8", "trainer.max_steps=8", "trainer.log_every=4", "trainer.ckpt_every=100",
        "trainer.val_batches=0", *moe,
    ])  # fmt: skip
    counter = CountReadbacks(4)
    run = train(cfg, callbacks=(counter,))
    assert len(counter.counts) == 5  # steps 2, 3, 5, 6, 7
    assert counter.counts == [0] * 5, counter.calls
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3  # header, steps 1, 4, 8: the losses and grad_norm still reach metrics.csv


def test_bench_step_rows_survive_a_kill(tmp_path: Path) -> None:
    """`bench step` writes each build's row as soon as it is measured (markdown and JSON lines): a bench killed
    mid-run (as the GPU check's timeout does) leaves what it measured."""
    out = tmp_path / "step.md"
    code = (
        "from aimpre.bench.step import StepSettings, run_step; import time; "
        "s = StepSettings(steps=1, warmup=0, quick=True, "
        "model={'img_size': 28, 'depth': 1, 'dec_depth': 1, 'text_len': 8}); "
        f"run_step(s, builds=('plain', 'bf16'), out={str(out)!r}); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-P", "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = rows_when_killed(proc, out.with_suffix(".jsonl"), proc.kill)
    assert rows and rows[0]["build"] == "plain" and rows[0]["step_ms"] > 0
    assert "| plain (eager, SDPA) |" in out.read_text()


def test_bench_step_builds_start_from_a_clean_compiler() -> None:
    """Each build of `bench step` runs in its own process with its own empty Inductor/Triton caches: what this
    process (or an earlier build) compiled is not there when a build starts."""
    from aimpre.bench.step import StepSettings, bench_step, compiler_state

    torch._dynamo.reset()
    torch.compile(lambda x: x + 1, backend="eager")(torch.ones(2))  # compiler state the builds must not see
    here = compiler_state()
    assert here["graphs"] >= 1
    s = StepSettings("tiny", batch=2, steps=1, warmup=0, backend="sdpa", quick=True,
                     model={"img_size": 28, "depth": 1, "dec_depth": 1, "text_len": 8})  # fmt: skip
    rows = bench_step(s, builds=("plain", "bf16"), fresh=True)
    starts = [r.start for r in rows]
    assert all(r.step_ms for r in rows), [r.note for r in rows]
    assert [s["graphs"] for s in starts] == [0, 0]
    assert len({here["pid"], *(s["pid"] for s in starts)}) == 3
    caches = [s["inductor_cache"] for s in starts] + [s["triton_cache"] for s in starts]
    assert len(set(caches)) == 4 and here["inductor_cache"] not in caches
    assert all(not Path(c).exists() for c in caches)  # each a temporary folder of its build, removed after it


def test_bench_attention_rows_survive_a_kill(tmp_path: Path) -> None:
    """`bench attention` (as ops and fp8, through aimpre.bench.timing.RowsSoFar) writes each row as soon as it is
    measured: killed after its first row, its markdown and JSON lines hold that row."""
    out = tmp_path / "attention.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen([sys.executable, "-P", "-m", "aimpre", "bench", "attention", "--quick", "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL)  # fmt: skip
    rows = rows_when_killed(proc, out.with_suffix(".jsonl"), proc.kill)
    assert proc.returncode != 0  # killed, not finished
    assert rows[0]["impl"] == "triton (ours)" and rows[0]["case"]["name"] == "encoder (tiny)" and rows[0]["b2b_ms"] > 0
    report = out.read_text()
    assert report.startswith("# attention benchmark (in progress: rows so far)")
    assert "| encoder (tiny) (2, 1, 40, 64) | prefix | triton (ours) |" in report
