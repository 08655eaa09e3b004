"""Probes of frozen encoders: linear (logistic regression) and kNN accuracy on pooled features.

``probe(models, dataset)`` compares teacher presets, students before distillation and trained
students side by side (``movekd probe``).
"""

from movekd.probe.classifiers import knn_probe, linear_probe
from movekd.probe.datasets import ProbeData, ProbeDatasetError, list_probe_datasets, load_probe_dataset
from movekd.probe.encoders import load_encoder, pooled_features
from movekd.probe.run import format_table, probe

__all__ = ["ProbeData", "ProbeDatasetError", "format_table", "knn_probe", "linear_probe", "list_probe_datasets",
           "load_encoder", "load_probe_dataset", "pooled_features", "probe"]
