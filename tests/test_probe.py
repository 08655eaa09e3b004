"""Probes: classifiers on synthetic features of known separability, datasets, the CLI on a trained run."""

from __future__ import annotations

import json

import pytest
import torch

from movekd.probe import knn_probe, linear_probe, load_probe_dataset
from movekd.probe.datasets import ProbeDatasetError


def _gaussians(separation: float, n: int = 300, dim: int = 16, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    centres = separation * centres / centres.norm(dim=-1, keepdim=True)
    y = torch.arange(n) % classes
    x = centres[y] + torch.randn(n, dim, generator=g)
    return x, y


@pytest.mark.parametrize("probe", [linear_probe, knn_probe])
def test_separable_features_are_classified_and_noise_is_at_chance(probe):
    x, y = _gaussians(separation=12.0)
    assert probe(x[:200], y[:200], x[200:], y[200:])["accuracy"] >= 0.99
    noise_x, _ = _gaussians(separation=0.0, seed=1)
    labels = torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(2))
    assert probe(noise_x[:200], labels[:200], noise_x[200:], labels[200:])["accuracy"] < 0.5


def test_linear_probe_beats_knn_when_one_direction_carries_the_label():
    # Label in one coordinate, 63 noise coordinates at 5x its scale: linear finds it, cosine kNN drowns.
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 2
    x = torch.randn(400, 64, generator=g) * 5
    x[:, 0] = y * 2.0 - 1.0 + 0.1 * torch.randn(400, generator=g)
    lin = linear_probe(x[:300], y[:300], x[300:], y[300:])["accuracy"]
    knn = knn_probe(x[:300], y[:300], x[300:], y[300:])["accuracy"]
    assert lin >= 0.95 and knn < 0.75


def test_probe_is_deterministic():
    x, y = _gaussians(separation=2.0)
    assert linear_probe(x[:200], y[:200], x[200:], y[200:]) == linear_probe(x[:200], y[:200], x[200:], y[200:])


def test_datasets_split_fixed_by_seed_and_missing_files_named(monkeypatch, tmp_path):
    a, b = load_probe_dataset("squares", 40, 20, seed=3), load_probe_dataset("squares", 40, 20, seed=3)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert a.train_images.dtype == torch.uint8 and a.train_images.shape == (40, 3, 32, 32)
    monkeypatch.setenv("MOVEKD_FASHION_MNIST", str(tmp_path))
    monkeypatch.setattr("movekd.probe.datasets.fashion_mnist.DEBIAN_DIRS", ())
    with pytest.raises(ProbeDatasetError, match="dataset-fashion-mnist"):
        load_probe_dataset("fashion-mnist")
    with pytest.raises(ProbeDatasetError, match="unknown probe dataset 'nope'"):
        load_probe_dataset("nope")


def test_fashion_mnist_reads_idx_files(monkeypatch, tmp_path):
    import gzip

    import numpy as np

    def idx(path, array):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
        with gzip.open(path, "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())

    for prefix, n in (("train", 30), ("t10k", 10)):
        idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.arange(n * 28 * 28).reshape(n, 28, 28) % 256)
        idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setenv("MOVEKD_FASHION_MNIST", str(tmp_path))
    data = load_probe_dataset("fashion-mnist", 20, None, seed=0)
    assert data.train_images.shape == (20, 3, 28, 28) and len(data.test_labels) == 10
    assert data.test_labels.tolist() == list(range(10))


def test_cli_probes_a_trained_run(tmp_path, capsys):
    from movekd.cli import main
    from movekd.train.config import load_config
    from movekd.train.loop import train
    from train_fixtures import tiny_config

    cfg = tiny_config(tmp_path, steps=(2, 2))
    config = load_config(cfg)
    train(config, show_progress=False)
    assert main(["probe", str(config.run_dir), "--dataset", "squares", "--train", "40", "--test", "20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    row = result["rows"][0]
    assert row["kind"] == "trained" and row["dim"] == 32 and 0.0 <= row["knn"] <= 1.0
    assert result["dataset"]["train"] == 40
    assert main(["probe", "no-such-model", "--dataset", "squares"]) == 2
    assert "unknown encoder 'no-such-model'" in capsys.readouterr().err


def test_encoder_names_take_a_size_and_bad_ones_are_named():
    from movekd.probe import load_encoder

    with pytest.raises(ValueError, match="after '@' must be a positive integer"):
        load_encoder("student:dinov2_s14_imgfocus@big")
    with pytest.raises(ValueError, match="unknown encoder 'nope@84'"):
        load_encoder("nope@84")
