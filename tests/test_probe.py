"""Probes: labels from shards, the attention-pooling head, probe training on the real digits, feature caching."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from aimpre.cli import main
from aimpre.export import preprocessing_info, write_export
from aimpre.model import AIMv2Encoder, model_config
from aimpre.model.pooling import AttentionPoolingClassifier, MeanPoolingClassifier
from aimpre.probe import Layers, ProbeError, ProbeSettings, features, label_of, read_labelled, run_probe
from helpers import good_samples, jpeg, write_tar


def test_labels_come_from_cls_or_json() -> None:
    assert label_of({"cls": b"7\n"}) == 7
    assert label_of({"json": b'{"label": 3}'}) == 3 and label_of({"json": b'{"cls": "4"}'}) == 4
    assert label_of({"json": b'{"caption": "x"}'}) is None and label_of({"cls": b"seven"}) is None
    assert label_of({"txt": b"a digit"}) is None


def test_heads_are_permutation_invariant_poolers() -> None:
    """Both heads pool over tokens: shuffling the tokens of a sample must not change its logits."""
    torch.manual_seed(0)
    tokens = torch.randn(4, 10, 48)
    perm = torch.randperm(10)
    for head in (AttentionPoolingClassifier(48, 5, heads=4, queries=2), MeanPoolingClassifier(48, 5)):
        head.train()
        head(tokens)  # one step of BatchNorm statistics, then evaluate with them
        head.eval()
        logits = head(tokens)
        assert logits.shape == (4, 5)
        assert torch.allclose(logits, head(tokens[:, perm]), atol=1e-5)
        assert not torch.allclose(logits[0], logits[1])


def test_probe_trains_on_real_digits_and_caches_features(demo: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A random 1-block encoder's tokens already separate the digits well above chance (10%) under both probes;
    the second run reads the cached features and reproduces the numbers."""
    monkeypatch.setenv("AIMPRE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    enc = AIMv2Encoder(model_config("tiny", depth=1, vocab_size=258))
    pre = preprocessing_info((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 112)
    path = write_export(enc, "safetensors", tmp_path / "enc", info={"preprocessing": pre})
    train, test = str(demo / "digits-train-000000.tar"), str(demo / "digits-test-000000.tar")
    settings = ProbeSettings(epochs=5)  # the CLI below runs the same settings
    res = run_probe(path, train, test, settings=settings, out=tmp_path / "probe.json")
    assert (res["n_train"], res["n_test"], res["classes"]) == (1258, 539, 10)
    for kind in ("attentive", "linear"):
        assert res["results"]["encoder"][kind]["top1"] > 0.5, kind
    assert json.loads((tmp_path / "probe.json").read_text())["results"] == res["results"]
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 2
    again = run_probe(path, train, test, kinds=("linear",), settings=settings)
    assert again["results"]["encoder"]["linear"] == res["results"]["encoder"]["linear"]
    args = ["probe", str(path), "--train", train, "--test", test, "--kind", "linear", "--epochs", "5"]
    assert main(args) == 0  # the CLI, on the cached features
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("encoder"))
    assert line.split()[1] == f"{res['results']['encoder']['linear']['top1']:.1%}"
    assert json.loads((path / "probe.json").read_text())["results"]["encoder"]["linear"]["top1"] > 0.5  # beside it
    assert main(["probe", str(path), "--train", "demo:digits"]) == 2 and "no split" in capsys.readouterr().err
    unlabelled = write_tar(tmp_path / "captions-only.tar", good_samples("cap", 8))  # (the demo labels every split)
    with pytest.raises(ProbeError, match="no labelled images"):
        run_probe(path, str(unlabelled), None, settings=settings)
    with pytest.raises(ProbeError, match="no split 'digits'"):
        run_probe(path, "demo:digits", None, settings=settings)


def test_damaged_labelled_shards_are_read_past_and_counted(tmp_path: Path) -> None:
    """probe reads shards with the training reader: a corrupt header costs its sample, not a traceback."""
    samples = [{"__key__": f"k{i:03d}", "jpg": jpeg((i * 20, 0, 0)), "cls": str(i % 3)} for i in range(10)]
    shard = write_tar(tmp_path / "labelled.tar", samples)
    with tarfile.open(shard) as tar:
        at = tar.getmember("k004.cls").offset_data - 512
    raw = bytearray(shard.read_bytes())
    raw[at + 150] ^= 0x11  # a checksum digit
    shard.write_bytes(raw)
    images, labels, skipped = read_labelled([str(shard)], 16)
    assert labels.tolist() == [i % 3 for i in range(10) if i != 4] and images.shape == (9, 3, 16, 16)
    assert skipped == {"bad_header": 1, "samples_lost": 1}
    junk = tmp_path / "junk.tar"
    junk.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(ProbeError, match="not_a_tar"):
        read_labelled([str(junk)], 16)


def test_probe_layers_average_or_concatenate_chosen_blocks(tmp_path: Path, monkeypatch, capsys) -> None:
    """--layers probes chosen blocks through the final norm: block -1 is the output, concat widens the tokens,
    each choice is cached under its own key and recorded in probe.json; a block the encoder lacks is refused."""
    monkeypatch.setenv("AIMPRE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    enc = AIMv2Encoder(model_config("tiny", depth=2, vocab_size=258)).eval()
    pre = preprocessing_info((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 112)
    path = write_export(enc, "safetensors", tmp_path / "enc", info={"preprocessing": pre})
    samples = [{"__key__": f"k{i:03d}", "jpg": jpeg((i * 20, 255 - i * 20, 0)), "cls": str(i % 2)} for i in range(12)]
    urls = [str(write_tar(tmp_path / "labelled.tar", samples))]
    out, _ = features(enc, pre, urls, None)
    last, _ = features(enc, pre, urls, None, layers=Layers((-1,)))
    torch.testing.assert_close(last, out, rtol=0, atol=0)
    both, _ = features(enc, pre, urls, None, layers=Layers((0, 1), "concat"))
    mean, _ = features(enc, pre, urls, None, layers=Layers((0, 1)))
    assert both.shape == (12, out.shape[1], 2 * out.shape[2]) and mean.shape == out.shape
    torch.testing.assert_close(both[..., out.shape[2] :], out, rtol=0, atol=0)
    torch.testing.assert_close(mean.float(), (both[..., : out.shape[2]].float() + out.float()) / 2, atol=2e-3, rtol=0)
    args = ["probe", str(path), "--train", urls[0], "--test", "none", "--kind", "linear", "--epochs", "2"]
    assert main([*args, "--layers", "0", "1", "--merge", "concat"]) == 0
    assert "features: concat of blocks 0, 1" in capsys.readouterr().out
    assert json.loads((path / "probe.json").read_text())["layers"] == {"blocks": [0, 1], "merge": "concat"}
    assert main(args) == 0
    assert json.loads((path / "probe.json").read_text())["layers"] == "output"
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 2  # one per choice of features
    assert main([*args, "--layers", "2"]) == 2
    err = capsys.readouterr().err
    assert "--layers" in err and "2 blocks" in err
