"""Data: prepared-data sources, NumPy augmentation, view/geometry registries and Grain pipelines (see docs/data.md)."""
from csl_jax.data.pipeline import StreamSpec, epoch_length, eval_dataset, stream_id, stream_iterator
from csl_jax.data.sources import DatasetInfo, dataset_info, dataset_record, ensure_prepared
from csl_jax.data.transforms import GEOMETRIES, IMAGENET_MEAN, IMAGENET_STD, normalize, register_geometry
from csl_jax.data.views import VIEWS, register_view

__all__ = ["DatasetInfo", "dataset_info", "dataset_record", "ensure_prepared", "eval_dataset", "StreamSpec", "stream_iterator",
           "epoch_length", "stream_id", "VIEWS", "register_view", "GEOMETRIES", "register_geometry", "IMAGENET_MEAN",
           "IMAGENET_STD", "normalize"]
