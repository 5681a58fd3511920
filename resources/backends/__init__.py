"""Backends: the interface to a cloud per resource type, and the simulated cloud (the default)."""

from .base import Changes, InstanceBackend, ResourceBackend, VolumeBackend, get_backend, register_backend
from .simulated import SimulatedCloud, SimulatedConfig

__all__ = [
    "Changes",
    "InstanceBackend",
    "ResourceBackend",
    "SimulatedCloud",
    "SimulatedConfig",
    "VolumeBackend",
    "get_backend",
    "register_backend",
]
