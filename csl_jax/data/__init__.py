"""Data: prepared-data sources, NumPy augmentation and Grain pipelines (see docs/data.md)."""
from csl_jax.data.pipeline import (eval_dataset, iterations_per_epoch, labeled_iterator,
                                   unlabeled_iterator)
from csl_jax.data.sources import DatasetInfo, dataset_info, ensure_prepared
from csl_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize

__all__ = ["DatasetInfo", "dataset_info", "ensure_prepared", "eval_dataset", "iterations_per_epoch",
           "labeled_iterator", "unlabeled_iterator", "IMAGENET_MEAN", "IMAGENET_STD", "normalize"]
