"""aimpre: pretraining vision encoders the AIMv2 way."""

__version__ = "0.1.0"
