from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aimpre.config import ConfigError, load_config
from aimpre.data import HFTokenizer, build_tokenizer, shard_set
from aimpre.data.scan import iter_captions
from aimpre.data.tokenizer import train_bpe
from aimpre.train import train


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory, pretrain_spec: str) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_bpe(iter_captions(shard_set(pretrain_spec), limit=2000), 320, out)


def test_trained_bpe_round_trips_and_compresses(bpe: Path) -> None:
    tok = build_tokenizer(str(bpe))
    assert isinstance(tok, HFTokenizer) and (tok.pad_id, tok.eos_id) == (0, 1) and tok.vocab_size == 320
    caption = "Large red circle at the top and small blue square in the middle, on gray"
    ids = tok.encode(caption)
    assert tok.decode(ids) == caption.lower()
    assert len(ids) < len(caption) / 2  # merges learnt from the demo captions
    assert tok.decode(tok.encode("never seen: ünïcödé ✓")) == "never seen: ünïcödé ✓"  # byte-level: no unknowns
    assert tok.identity()["sha256"] == build_tokenizer(str(bpe)).identity()["sha256"]


def test_tokenizer_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither 'bytes' nor an existing"):
        build_tokenizer(str(tmp_path / "missing.json"))
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    with pytest.raises(ValueError, match=r"junk\.json"):
        build_tokenizer(str(junk))
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["a"], 100, tmp_path / "t.json")


def test_train_tokenizer_cli(tmp_path: Path, val_spec: str) -> None:
    out = tmp_path / "tok.json"
    cmd = [
        sys.executable,
        "-m",
        "aimpre",
        "data",
        "train-tokenizer",
        val_spec,
        "--vocab-size",
        "300",
        "--out",
        str(out),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "vocabulary 300, pad id 0, end-of-text id 1" in run.stdout
    assert json.loads(out.read_text())["model"]["type"] == "BPE"


def test_runs_record_their_tokenizer_and_refuse_another(tmp_path: Path, bpe: Path, pretrain_spec: str) -> None:
    common = [f"run.out_dir={tmp_path}", "run.name=bpe", f"data.train_shards={pretrain_spec}", "data.val_shards=null",
              "data.batch_size=4", "data.num_workers=0", "trainer.max_steps=2", "trainer.ckpt_every=2"]  # fmt: skip
    run = train(load_config(None, [*common, f"data.tokenizer={bpe}"]))
    assert (run / "tokenizer.json").read_text() == bpe.read_text()
    assert json.loads((run / "tokenizer.identity.json").read_text())["kind"] == "hf"
    assert load_config(run / "config.yaml").model.vocab_size == 320  # taken from the tokenizer
    with pytest.raises(ConfigError, match="tokenizer"):
        train(load_config(None, [*common, "trainer.max_steps=4", "model.vocab_size=320"]), resume=True)
