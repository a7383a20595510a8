"""Scaling laws for AIMv2 pretraining: FLOP and parameter counting, sweep plans and their runner, collection
of finished runs, law fits with bootstrap intervals, compute-optimal predictions and plots.

Never imports Lightning: sweep points train in their own processes (``aimpre train``).
"""

from aimpre.scaling.flops import (
    Flops,
    flops_per_sample,
    forward_flops,
    param_count,
    param_counts,
    training_flops,
)

__all__ = ["Flops", "flops_per_sample", "forward_flops", "param_count", "param_counts", "training_flops"]
