"""What a user sees: help with defaults and an example per command, ``config show``, sizes named on error."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import typing

import pytest

from aimpre.cli import EXAMPLES, build_parser, main
from aimpre.config import Config, describe, field_help, load_config
from aimpre.model.sizes import ModelConfig


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every leaf command's parser, by its name after "aimpre"."""
    out = {}
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {parser.prog.removeprefix("aimpre").strip(): parser}
    for child in subs[0].choices.values():
        out.update(_commands(child))
    return out


def test_every_command_has_an_example_that_parses() -> None:
    commands = _commands(build_parser())
    assert set(commands) == set(EXAMPLES)
    for name, example in EXAMPLES.items():
        argv = shlex.split(example.split(">")[0])
        assert argv[0] == "aimpre"
        args = build_parser().parse_args(argv[1:])  # exits (SystemExit) if the example is wrong
        assert callable(args.fn), name
        text = commands[name].format_help()
        assert f"example:\n  {example}" in text, name


def test_help_shows_defaults_but_not_noise() -> None:
    text = _commands(build_parser())["data make-shards"].format_help()
    assert "(default: shard)" in text and "(default: path)" in text  # --prefix, and --path-col, which had no help
    assert "samples per shard (default 1000)" in text and "(default: 1000)" not in text  # already said
    fit = _commands(build_parser())["scaling fit"].format_help()
    assert "(default: chinchilla)" in fit and "(default: 95.0)" in fit
    assert "relative (0.15)" in fit and "(default: 0.15)" not in fit  # the value in parentheses is the default
    assert "(default: False)" not in fit and "(default: None)" not in fit
    assert "demo data set as webdataset shards" in _commands(build_parser())["data demo"].format_help()  # description


def test_every_config_key_has_help() -> None:
    for section, cls in typing.get_type_hints(Config).items():
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            assert len(helps.get(f.name, "")) > 5, f"{section}.{f.name} has no help"
    assert set(field_help(ModelConfig)) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert "tiny, large, huge, 1b, 3b" in field_help(ModelConfig)["size"]
    data = field_help(typing.get_type_hints(Config)["data"])
    assert data["train_shards"].endswith('one source each; "demo" is the embedded demo set')  # 2 lines above it
    assert data["mean"].endswith("every export records what was used; per-channel mean of 0..1 pixels")
    assert field_help(typing.get_type_hints(Config)["optim"])["betas"] == "AdamW betas"


def test_config_show_prints_every_key_value_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "model.size=large", "optim.lr=3e-4", "data.crop_scale=[0.5, 1.0]"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = describe(load_config(None, ["model.size=large", "optim.lr=3e-4", "data.crop_scale=[0.5, 1.0]"]))
    assert len(lines) == len(rows) == sum(len(dataclasses.fields(c)) for c in typing.get_type_hints(Config).values())
    shown = {line.split()[0]: line for line in lines}
    assert shown["model.width"].split()[1] == "1024"  # large's value, not the default tiny's
    assert shown["optim.lr"].split()[1] == "0.0003" and "peak" in shown["optim.lr"]
    assert "[0.5, 1.0]" in shown["data.crop_scale"]
    # the value column is how an override spells it: feeding every row back gives the same config
    again = load_config(None, [f"{key}={value}" for key, value, _ in rows])
    assert again == load_config(None, ["model.size=large", "optim.lr=3e-4", "data.crop_scale=[0.5, 1.0]"])


@pytest.mark.parametrize(
    "argv",
    [["model-info", "xl"], ["config", "show", "model.size=xl"], ["bench", "step", "--size", "xl", "--steps", "1"]],
    ids=["model-info", "config", "bench-step"],
)
def test_unknown_size_lists_the_sizes(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("aimpre: error:") and "'xl'" in err and "tiny, large, huge, 1b, 3b" in err
