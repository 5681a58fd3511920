"""Executors: the logical operations services call (never single steps)."""

from .base import BaseExecutor, ExecutorStage, OperationHandle, OperationTimeout
from .examples import (
    InstanceCreateExecutor,
    InstanceDeleteExecutor,
    InstanceResizeExecutor,
    InstanceUpdateExecutor,
    VolumeCreateExecutor,
    VolumeDeleteExecutor,
    VolumeExtendExecutor,
)
from .standard import ActionExecutor, CreateExecutor, DeleteExecutor, UpdateExecutor

__all__ = [
    "ActionExecutor",
    "BaseExecutor",
    "CreateExecutor",
    "DeleteExecutor",
    "ExecutorStage",
    "InstanceCreateExecutor",
    "InstanceDeleteExecutor",
    "InstanceResizeExecutor",
    "InstanceUpdateExecutor",
    "OperationHandle",
    "OperationTimeout",
    "UpdateExecutor",
    "VolumeCreateExecutor",
    "VolumeDeleteExecutor",
    "VolumeExtendExecutor",
]
