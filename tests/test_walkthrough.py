"""The README's "Train on your own images" walkthrough, run end to end as a user runs it.

The commands and the Python snippet are read from the README section itself, so the README cannot drift from what
works: each ``$ aimpre ...`` line of its console blocks runs as a subprocess (the installed ``aimpre`` script) in a
directory of small generated images, and the lines the README shows under it must appear in what it prints, in
order (numbers may differ: losses and timings vary by machine; ``...`` stands for lines left out).
"""

from __future__ import annotations

import csv
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Train on your own images"
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def write_images(root: Path, n_train: int = 40, n_heldout: int = 8) -> None:
    """``photos/imgNNN.jpg`` + ``.txt`` captions (the folder route) and ``heldout/`` listed in ``heldout.csv``
    (the CSV route): one coloured circle or square on a light background, 160 x 120, captioned by what it shows."""
    rng = random.Random(0)
    for d in ("photos", "heldout"):
        (root / d).mkdir()
    rows = []
    for i in range(n_train + n_heldout):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(("circle", "square"))
        img = Image.new("RGB", (160, 120), (245, 245, 240))
        x, y, r = rng.randint(30, 130), rng.randint(30, 90), rng.randint(12, 28)
        draw = ImageDraw.Draw(img)
        (draw.ellipse if shape == "circle" else draw.rectangle)((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
        caption = f"a {colour} {shape} on a white background"
        folder = "photos" if i < n_train else "heldout"
        img.save(root / folder / f"img{i:03d}.jpg", quality=90)
        if folder == "photos":
            (root / folder / f"img{i:03d}.txt").write_text(caption + "\n")
        else:
            rows.append((f"heldout/img{i:03d}.jpg", caption))
    with open(root / "heldout.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "caption"), *rows])


def walkthrough() -> tuple[list[tuple[str, list[str]]], str]:
    """The section's console commands with the lines shown under each, and its Python snippet."""
    text = README.read_text()
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    commands: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", section, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                commands.append((line[2:], []))
            elif commands:
                commands[-1][1].append(line)
    snippets = re.findall(r"```python\n(.*?)```", section, re.S)
    assert commands and len(snippets) == 1, "the walkthrough has console blocks and one Python block"
    return commands, snippets[0]


def _pattern(line: str) -> re.Pattern:
    """A README output line as a pattern: numbers may differ, runs of spaces too."""
    parts = re.split(r"(\d+\.\d+(?:e[-+]\d+)?|\s+)", line.strip())
    out = []
    for p in parts:
        if re.fullmatch(r"\d+\.\d+(?:e[-+]\d+)?", p):
            out.append(r"-?\d+\.\d+(?:e[-+]\d+)?")
        elif p.isspace():
            out.append(r"\s+")
        else:
            out.append(re.escape(p))
    return re.compile("".join(out))


def check_output(command: str, shown: list[str], printed: str) -> None:
    """Every shown line (bar ``...`` and blanks) matches a printed line, in the README's order."""
    lines = [ln.strip() for ln in printed.splitlines()]
    at = 0
    for want in (s for s in shown if s.strip() and s.strip() != "..."):
        pat = _pattern(want)
        while at < len(lines) and not pat.fullmatch(lines[at]):
            at += 1
        assert at < len(lines), f"`{command}` did not print {want!r} (in order); it printed:\n{printed[-3000:]}"
        at += 1


@pytest.mark.slow
def test_readme_walkthrough_runs_end_to_end(tmp_path: Path) -> None:
    commands, snippet = walkthrough()
    write_images(tmp_path)
    script = Path(sys.executable).with_name("aimpre")  # the console script pip installed beside this python
    aimpre = [str(script)] if script.is_file() else [sys.executable, "-m", "aimpre.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for command, shown in commands:
        argv = shlex.split(command)
        assert argv[0] == "aimpre", f"the walkthrough runs only aimpre commands, not {command!r}"
        r = subprocess.run(
            [*aimpre, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert r.returncode == 0, f"`{command}` exited {r.returncode}:\n{r.stderr[-3000:]}"
        check_output(command, shown, r.stdout)
    r = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert r.returncode == 0, f"the README's Python snippet failed:\n{r.stderr[-3000:]}"
    shown = [m for m in re.findall(r"# prints: (.*)", snippet)]
    assert shown, "the snippet says what it prints (# prints: ...)"
    check_output("the Python snippet", shown, r.stdout)


def test_output_check_can_fail() -> None:
    """The comparison is not vacuous: another number format, a missing line or the wrong order fail it."""
    printed = "read 40, kept 40 from 3 shard(s)\n  captions cut at 96 tokens: 0\nloss      1.4805    0.4325"
    check_output("c", ["read 40, kept 40 from 3 shard(s)", "...", "loss 6.2771 0.9916"], printed)
    for shown in (["read 40, kept 39 from 3 shard(s)"], ["loss 6.2771 0.9916", "read 40, kept 40 from 3 shard(s)"]):
        with pytest.raises(AssertionError):
            check_output("c", shown, printed)
