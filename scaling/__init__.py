"""Scaling-law toolkit: FLOP counting (sweeps, fits and plots grow here). Never imports Lightning."""

from aimpre.scaling.flops import Flops, flops_per_sample, training_flops

__all__ = ["Flops", "flops_per_sample", "training_flops"]
