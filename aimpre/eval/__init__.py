"""What judges a frozen encoder: probes, the VLM probe, fusion of encoders."""
