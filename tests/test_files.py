"""The bounded readers in aimpre.files that every metadata read goes through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aimpre.files import UntrustedInputError, parse_json, read_json


def test_deep_json_is_one_line_error(tmp_path: Path) -> None:
    p = tmp_path / "deep.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UntrustedInputError, match=r"deep\.json nests lists or mappings deeper than 64"):
        read_json(p, "metadata")
    with pytest.raises(UntrustedInputError, match="deeper than 3"):
        parse_json('{"a": [[[1]]]}', "x", max_depth=3)
    assert parse_json('{"a": [[1]]}', "x", max_depth=3) == {"a": [[1]]}


def test_size_and_kind_checked_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_text('"' + "a" * 1000 + '"')
    with pytest.raises(UntrustedInputError, match=r"big\.json is 1002 bytes, over the 100"):
        read_json(big, "summary", max_bytes=100)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it to read would block forever
    with pytest.raises(UntrustedInputError, match="not a regular file"):
        read_json(fifo, "summary")
    with pytest.raises(UntrustedInputError, match="not valid JSON"):
        parse_json(b"{oops", "caption")
