"""What judges a frozen encoder: held-out scene-attribute probes, localization, the VLM probe and fusion of
encoders (and, beside them, ``aimpre.probe``)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def finish_record(res: dict[str, Any], start: float, out: Path | None) -> dict[str, Any]:
    """``res`` with the machine, the date and the seconds since ``start`` added, written as JSON to ``out``
    (atomically) when given: the one way every evaluation records what it measured on."""
    import torch  # here: the CLI's parser imports this package, and --help must not import torch

    from aimpre.files import write_text

    res.update(
        machine=f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        date=time.strftime("%Y-%m-%d"),
        seconds=round(time.time() - start, 1),
    )
    if out is not None:
        write_text(out, json.dumps(res, indent=2) + "\n")
    return res
