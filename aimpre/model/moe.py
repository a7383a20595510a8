"""Mixture-of-experts SwiGLU feed-forward: AIMv2-MoE's encoder blocks.

Checked against apple/ml-l3m ``configs/aimv2/002_aimv2_moe_hfdata.yaml`` (``ffn_target: l3m.model.layers.moe.MoE``,
a wrapper of megablocks' ``dMoE``) and megablocks ``layers/router.py``, ``layers/moe.py``:

- router: ``Linear(d, E, bias=False)`` -> softmax over the E experts -> top-k (``top_k: 1``); the chosen
  probabilities weight the expert outputs as they are (``normalize_expert_weights: 0.0``: not renormalised), no
  jitter (``router_jitter_eps: 0.0``);
- dropless (``moe_class: dmoe``, ``capacity_factor: 0``): every token reaches its k experts, however uneven;
- experts: SwiGLU ``fc2(silu(fc1_g x) * fc1_x x)`` (``mlp_type: glu``, ``act_layer: nn.SiLU``), weights
  N(0, 0.02) (``MoE.init_weights``), computed grouped (``mlp_impl: grouped``): tokens sorted by expert and one
  grouped GEMM per projection (``torch._grouped_mm``) where torch has one for the device, a loop over the sorted
  groups elsewhere. No expert ever sees a token it was not routed.
- balance loss (megablocks ``batched_load_balancing_loss``, ml-l3m ``MoEBalancingLoss``), per layer
  ``E / (T * k) * sum_i c_i * P_i`` = ``E * sum_i f_i * P_i`` with c_i the tokens routed to expert i, f_i = c_i /
  (T * k) their share and P_i the mean router probability of expert i, then averaged over the MoE layers and
  scaled by ``load_balancing_loss_weight: 0.01``; it is 1 when the router is uniform.

Expert weights are stacked ``[E, out, in]`` (each expert an ``nn.Linear`` weight), so FSDP2 shards them as
ordinary parameters and a 1-expert MoE with ``fc1_g[0] = SwiGLU.fc1_g.weight`` (etc.) is the dense block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aimpre.kernels import fused as fused_ops


def grouped_mm_available(x: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs for ``x``'s device and dtype (else the sorted-token loop is used).

    CUDA: torch's grouped GEMM kernels need Hopper (sm90) or newer and bf16 (not run here: no GPU in this
    session). CPU: torch 2.14 ships a kernel for float32 and bf16 (checked once), forward and backward, one op for
    the compiler.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return x.device.type == "cpu" and _cpu_grouped_mm()


_CPU_GROUPED: bool | None = None


def _cpu_grouped_mm() -> bool:
    """Tried once: whether this torch's ``_grouped_mm`` accepts float32 CPU tensors."""
    global _CPU_GROUPED
    if _CPU_GROUPED is None:
        try:
            a, b = torch.ones(4, 4), torch.ones(2, 4, 4)  # rows of 16 bytes: the alignment it asks for
            out = torch._grouped_mm(a, b, offs=torch.tensor([1, 4], dtype=torch.int32))
            _CPU_GROUPED = bool(out.shape == (4, 4) and torch.all(out == 4))
        except (RuntimeError, NotImplementedError, TypeError):
            _CPU_GROUPED = False
    return _CPU_GROUPED


def expert_matmul(x: Tensor, w: Tensor, counts: Tensor, impl: str = "auto") -> Tensor:
    """Each group of rows of ``x`` times its expert's weight: ``x[rows of e] @ w[e].T``.

    Args:
        x: [R, in], rows sorted by expert.
        w: [E, out, in], one ``nn.Linear``-style weight per expert.
        counts: [E] rows per expert (summing to R).
        impl: grouped (``torch._grouped_mm``) | loop (one matmul per non-empty group) | auto (grouped where
            ``grouped_mm_available``).

    Returns:
        [R, out].
    """
    grouped = impl == "grouped" or (impl == "auto" and _aligned(x, w) and grouped_mm_available(x))
    if torch.compiler.is_compiling() and not (grouped and x.dtype in (torch.bfloat16, torch.float16)):
        # what the compiler cannot trace: torch's fake (meta) grouped GEMM takes 16-bit inputs only, and the loop
        # splits by sizes read on the host (a data-dependent graph break per projection). Both run as one opaque
        # op of known output shape, so a compiled block stays one graph.
        return torch.ops.aimpre.expert_matmul(x, w, counts, grouped)
    return _expert_matmul(x, w, counts, grouped)


def _aligned(x: Tensor, w: Tensor) -> bool:
    """torch's grouped GEMM wants every row stride a multiple of 16 bytes (both devices)."""
    return all(n * x.element_size() % 16 == 0 for n in w.shape[1:])


def _expert_matmul(x: Tensor, w: Tensor, counts: Tensor, grouped: bool) -> Tensor:
    if grouped:
        offs = counts.cumsum(0).to(torch.int32)  # group e ends at row offs[e]
        out: Tensor = torch._grouped_mm(x, w.to(x.dtype).transpose(-2, -1), offs=offs)
        return out
    # the sizes are needed on the host to split (a sync on GPUs)
    parts = torch.split(x, counts.tolist())
    return torch.cat([p @ w[e].to(p.dtype).t() for e, p in enumerate(parts)])


@torch.library.custom_op("aimpre::expert_matmul", mutates_args=())
def _expert_matmul_op(x: Tensor, w: Tensor, counts: Tensor, grouped: bool) -> Tensor:
    return _expert_matmul(x, w, counts, grouped)


@_expert_matmul_op.register_fake
def _(x: Tensor, w: Tensor, counts: Tensor, grouped: bool) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("aimpre::expert_weight_grad", mutates_args=())
def _expert_weight_grad(x: Tensor, dy: Tensor, counts: Tensor) -> Tensor:
    """dW[e] = dy[rows of e].T @ x[rows of e]: [E, out, in] (zero for an expert with no rows)."""
    sizes = counts.tolist()
    return torch.stack([d.t() @ p for d, p in zip(torch.split(dy, sizes), torch.split(x, sizes), strict=True)])


@_expert_weight_grad.register_fake
def _(x: Tensor, dy: Tensor, counts: Tensor) -> Tensor:
    return x.new_empty(counts.shape[0], dy.shape[1], x.shape[1])


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    x, w, counts, grouped = inputs
    ctx.save_for_backward(x, w, counts)
    ctx.grouped = grouped  # type: ignore[attr-defined]


def _backward(ctx: torch.autograd.function.FunctionCtx, dy: Tensor) -> tuple[Tensor | None, ...]:
    x, w, counts = ctx.saved_tensors  # type: ignore[attr-defined]
    # y_e = x_e @ w_e.T: dx_e = dy_e @ w_e (the same op with w_e.T as the weight), dw_e = dy_e.T @ x_e
    dx = _expert_matmul_op(dy, w.transpose(-2, -1).contiguous(), counts, ctx.grouped)  # type: ignore[attr-defined]
    dw = _expert_weight_grad(x, dy.to(x.dtype), counts).to(w.dtype)
    return dx, dw, None, None


_expert_matmul_op.register_autograd(_backward, setup_context=_setup_context)


class MoEFeedForward(nn.Module):
    """A top-k routed mixture of SwiGLU experts, dropless; its routing statistics end in ``stats`` (set by
    ``forward``, or by the ``Block`` that calls ``routed``).

    ``stats`` (training only, as megablocks records them): (f [E] the share of the routed token slots each expert
    got, P [E] its mean router probability); ``balance_loss`` turns them into the balance loss and the encoder
    collects them after its forward (``AIMv2Encoder.moe_stats``).
    """

    def __init__(self, dim: int, hidden: int, experts: int, top_k: int = 1, fused: str = "torch") -> None:
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"model.moe_top_k {top_k} must be in 1..model.moe_experts ({experts})")
        fused_ops.check_mode(fused)
        self.experts, self.top_k, self.fused = experts, top_k, fused
        self.impl = "auto"  # tests pin grouped or loop
        self.router = nn.Linear(dim, experts, bias=False)
        self.fc1_g = nn.Parameter(torch.empty(experts, hidden, dim))
        self.fc1_x = nn.Parameter(torch.empty(experts, hidden, dim))
        self.fc2 = nn.Parameter(torch.empty(experts, dim, hidden))
        self.stats: tuple[Tensor, Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ml-l3m: experts N(0, 0.02) (``MoE.init_weights``), the router as every trunk linear (xavier)."""
        for w in (self.fc1_g, self.fc1_x, self.fc2):
            nn.init.normal_(w, std=0.02)
        nn.init.xavier_uniform_(self.router.weight)

    def forward(self, x: Tensor) -> Tensor:
        out, stats = self.routed(x)
        # kept in training only (megablocks records them so too); an eval forward clears them
        self.stats = stats if self.training else None
        return out

    def routed(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The output and the routing statistics (f, P) returned, not stored: what a ``Block`` calls, so a block
        under activation checkpointing and compile has no side effect inside the checkpointed region (Dynamo
        refuses one there: recomputing it in backward would replay it).

        Args:
            x: [..., d] tokens.
        """
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [B, N, d] -> [T, d]
        probs = self.router(x).float().softmax(-1)  # [T, E], float32 as megablocks' router scores
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [T, k]
        flat = chosen.flatten()  # [T*k] expert of each routed slot, token-major
        order = flat.argsort(stable=True)  # slots sorted by expert
        # [E] slots per expert; a scatter of fixed shape (bincount's output length depends on the data: a graph break)
        counts = torch.zeros(self.experts, dtype=torch.long, device=x.device).index_add_(0, flat, torch.ones_like(flat))
        token = order // self.top_k  # the token of each sorted slot
        xs = x[token]  # [T*k, d], grouped by expert
        h = fused_ops.silu_mul(
            expert_matmul(xs, self.fc1_g, counts, self.impl), expert_matmul(xs, self.fc1_x, counts, self.impl),
            self.fused,
        )  # fmt: skip
        y = expert_matmul(h, self.fc2, counts, self.impl)  # [T*k, d]
        y = y * weights.flatten()[order].unsqueeze(1).to(y.dtype)
        out = torch.zeros_like(x).index_add_(0, token, y)  # back to token order, the k slots summed
        return out.reshape(shape), (counts.float() / flat.numel(), probs.mean(0))


def balance_loss(stats: list[tuple[Tensor, Tensor]]) -> Tensor:
    """megablocks' load-balancing loss, unweighted: the mean over layers of ``E * sum_i f_i * P_i``.

    Args:
        stats: per MoE layer, (f [E] token shares, P [E] mean router probabilities), as ``MoEFeedForward.stats``.
    """
    per_layer = [f.shape[0] * torch.dot(f.detach(), p) for f, p in stats]  # f counts tokens: no gradient
    return torch.stack(per_layer).mean()


def moe_blocks(depth: int, blocks: list[int] | None) -> set[int]:
    """The encoder blocks that are MoE: ``model.moe_blocks`` (None: all, as ml-l3m), negatives from the end."""
    if blocks is None:
        return set(range(depth))
    return {b % depth for b in blocks}


__all__ = ["MoEFeedForward", "balance_loss", "expert_matmul", "grouped_mm_available", "moe_blocks"]
