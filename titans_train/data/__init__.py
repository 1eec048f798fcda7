"""Shard manifests, the deterministic global order and the exactly resumable streaming loader."""

from titans_train.data.errors import DataError
from titans_train.data.loader import (
    MicroBatch,
    StreamingLoader,
    check_sources,
    validation_loader,
)
from titans_train.data.manifest import ShardInfo, ShardManifest
from titans_train.data.order import GlobalOrder
from titans_train.data.position import LoaderPosition

__all__ = [
    "DataError",
    "GlobalOrder",
    "LoaderPosition",
    "MicroBatch",
    "ShardInfo",
    "ShardManifest",
    "StreamingLoader",
    "check_sources",
    "validation_loader",
]
