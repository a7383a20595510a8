"""Training: the Lightning module, optimiser and schedule, callbacks and the run orchestration."""

from aimpre.train.module import AIMv2DataModule, AIMv2Module
from aimpre.train.run import resolve, train

__all__ = ["AIMv2DataModule", "AIMv2Module", "resolve", "train"]
