"""What judges a frozen encoder: held-out scene-attribute probes, localization, the VLM probe and fusion of
encoders (and, beside them, ``aimpre.probe``)."""
