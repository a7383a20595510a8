from __future__ import annotations

from pathlib import Path

import pytest

from aimpre.config import Config, ConfigError, dump_config, load_config

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def test_defaults_are_the_tiny_demo_job() -> None:
    cfg = load_config()
    assert cfg.model.size == "tiny" and cfg.data.train_shards == "demo"
    assert cfg.model.vocab_size is None  # taken from the tokenizer


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_overrides_are_typed_and_applied() -> None:
    cfg = load_config(None, ["optim.lr=3e-4", "model.depth=3", "data.crop_scale=[0.5, 1.0]", "run.name=x"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model.depth == 3 and cfg.model.width == 192  # the rest of tiny stays
    assert cfg.data.crop_scale == (0.5, 1.0)


def test_size_then_keys(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  size: huge\n  depth: 2\noptim:\n  lr: 8e-4\n")
    cfg = load_config(f)
    assert (cfg.model.width, cfg.model.heads, cfg.model.depth) == (1536, 12, 2)
    assert cfg.optim.lr == pytest.approx(8e-4)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.dept=3", "'model.dept'; did you mean 'model.depth'"),
        ("optimizer.lr=1", "unknown config key 'optimizer'"),
        ("optim.lr=fast", "'optim.lr' must be float"),
        ("model.depth=2.5", "'model.depth' must be int"),
        ("data.hflip=maybe", "'data.hflip' must be bool"),
        ("model.size=giant", "unknown size 'giant'"),
        ("model.heads=5", "'model.width'"),
        ("model.img_size=100", "'model.img_size'"),
        ("model.prefix_min=0", "'model.prefix_min'"),
        ("optim.schedule=linear", "'optim.schedule'"),
        ("data.crop_scale=[0.9, 0.2]", "'data.crop_scale'"),
        ("trainer.max_steps=0", "'trainer.max_steps'"),
        ("model.attn_backend=cudnn", "'model.attn_backend'"),
        ("lr=1", "must be section.key"),
    ],
)
def test_bad_config_names_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_dump_roundtrip(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.size=large", "optim.lr=4e-4", "run.name=r"])
    f = tmp_path / "resolved.yaml"
    f.write_text(dump_config(cfg))
    assert load_config(f) == cfg
