"""``aimpre bench step``: one AIMv2 training step (forward, backward, fused AdamW), two ways, in one run.

- plain: the model compiled whole with ``torch.compile``, FlexAttention for the encoder's prefix mask and SDPA
  for the decoder's causal mask (``attn_backend=flex`` would also route causal through Flex, so the plain build
  uses ``auto``, which picks exactly these under compile), fused AdamW, bf16 autocast;
- ours: ``attn_backend`` (default ``triton``) with per-block compile, as ``aimpre train`` runs it.

Reports images/s, achieved TFLOP/s and MFU from ``aimpre.scaling.flops_per_sample``. Time is measured with CUDA
events over ``steps`` steps after ``warmup`` (compilation happens in the warm-up).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from aimpre.model import AIMv2, model_config
from aimpre.scaling import flops_per_sample
from aimpre.train.callbacks import peak_flops
from aimpre.train.parallel import parallelize


def _step_fn(model: AIMv2, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> Any:
    def step() -> None:
        with torch.autocast(batch["images"].device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(batch["images"], batch["text"], batch["mask"], batch["prefix"])
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _time(step: Any, device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def bench_step(
    size: str = "large",
    batch: int = 128,
    steps: int = 10,
    warmup: int = 5,
    backend: str = "triton",
    quick: bool = False,
) -> list[dict[str, Any]]:
    """Times both builds; returns rows of {build, img_per_s, tflops, mfu, step_ms}.

    Args:
        size: a model size.
        batch: images per step (one device).
        steps, warmup: timed and untimed steps.
        backend: our attention backend.
        quick: a CPU smoke run (no compile, float32), for checking the command works.
    """
    device = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name, attn, whole, blocks in (("plain (torch.compile, Flex + SDPA)", "auto", True, False),
                                       (f"aimpre ({backend}, compiled blocks)", backend, False, True)):  # fmt: skip
        cfg = replace(model_config(size, vocab_size=258 if quick else 32000), attn_backend=attn)
        torch.manual_seed(0)
        with torch.device(device):
            model = AIMv2(cfg)
        if not quick:
            parallelize(model, compile=blocks)
        run_model = torch.compile(model) if whole and not quick else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        g = torch.Generator(device="cpu").manual_seed(0)
        data = {
            "images": torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g).to(device),
            "text": torch.randint(2, cfg.vocab_size or 258, (batch, cfg.text_len), generator=g).to(device),
            "prefix": torch.randint(1, cfg.num_patches, (batch,), generator=g).to(device),
        }
        data["mask"] = torch.ones_like(data["text"], dtype=torch.bool)
        seconds = _time(_step_fn(run_model, opt, data, dtype), device, warmup, steps)  # type: ignore[arg-type]
        img_s = batch / seconds
        peak = peak_flops(device)
        achieved = img_s * flops_per_sample(cfg)
        rows.append({"build": name, "step_ms": seconds * 1e3, "img_per_s": img_s, "tflops": achieved / 1e12,
                     "mfu": achieved / peak if peak else None})  # fmt: skip
        del model, opt, run_model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
