"""What judges a frozen encoder: held-out scene-attribute probes, localization (and, beside them, ``aimpre.probe``)."""
