"""A simulated cloud: the default backend, with its state in Redis so every worker process shares it.

Objects move through runtime states with time (an instance is BUILD, then ACTIVE after ``build_ms``),
calls take a configurable latency, and failures are injected per method at a seeded rate. The
decision whether ``(method, resource)`` fails is a pure function of the seed, so a demo or a test can
predict every outcome before it runs. Time is Redis server time, shared by all processes.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from ..config import get_settings
from ..errors import BackendError, BackendNotFound
from ..models import Instance, Resource, Volume
from ..redis_client import get_redis
from .base import Changes, InstanceBackend, ResourceBackend, VolumeBackend, register_backend

__all__ = ["SimulatedCloud", "SimulatedConfig", "SimulatedInstanceBackend", "SimulatedVolumeBackend"]

#: Runtime states the simulated cloud reports, per resource type: (building, ready, erred).
RUNTIME_STATES = {"instance": ("BUILD", "ACTIVE", "ERROR"), "volume": ("creating", "available", "error")}


@dataclass
class SimulatedConfig:
    #: Each call sleeps a uniform random time in [min, max] milliseconds.
    latency_ms: tuple[int, int] = (0, 0)
    #: How long an object stays in its building state after create/resize.
    build_ms: int = 500
    #: How long a deleted object lingers before it is gone.
    delete_ms: int = 300
    #: Failure rate per call key, e.g. {"instance.create": 0.1}; a chosen (key, resource) always fails.
    failures: dict[str, float] = field(default_factory=dict)
    #: Like ``failures`` but only the first attempt of a chosen (key, resource) fails.
    transient_failures: dict[str, float] = field(default_factory=dict)
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> SimulatedConfig:
        data = json.loads(raw)
        data["latency_ms"] = tuple(data.get("latency_ms", (0, 0)))
        return cls(**data)


#: Takes the resource's name (KEYS[1]) and creates its object (KEYS[2]) in one step; counts the create.
_CREATE_ONCE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  return 0
end
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('INCR', KEYS[3])
redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
return 1
"""


def chosen(seed: int, key: str, uuid: str, rate: float) -> bool:
    """Whether the seeded draw for (key, resource) falls under ``rate``: the same answer in every process."""
    if rate <= 0:
        return False
    return random.Random(f"{seed}:{key}:{uuid}").random() < rate


class SimulatedCloud:
    """The shared state of the simulated cloud, and the knobs tests and the demo turn."""

    def __init__(self, client: redis.Redis | None = None, namespace: str | None = None) -> None:
        self.redis = client or get_redis()
        self.prefix = f"{namespace or get_settings().namespace}:sim"

    # -- configuration -------------------------------------------------------------------------
    def configure(self, config: SimulatedConfig) -> None:
        self.redis.set(f"{self.prefix}:config", config.to_json())

    def config(self) -> SimulatedConfig:
        raw = self.redis.get(f"{self.prefix}:config")
        return SimulatedConfig.from_json(raw) if raw else SimulatedConfig()

    def will_fail(self, key: str, uuid: str, config: SimulatedConfig | None = None) -> bool:
        config = config or self.config()
        return chosen(config.seed, key, uuid, config.failures.get(key, 0.0))

    def reset(self) -> None:
        keys = list(self.redis.scan_iter(f"{self.prefix}:*", count=1000))
        if keys:
            self.redis.delete(*keys)

    # -- what tests inspect ----------------------------------------------------------------------
    def creates_made(self, resource_type: str) -> int:
        return int(self.redis.get(f"{self.prefix}:creates:{resource_type}") or 0)

    def duplicate_creates(self) -> dict[str, int]:
        """Resources the cloud created more than one object for (should always be empty)."""
        counts = self.redis.hgetall(f"{self.prefix}:creates_by_ref")
        return {ref: int(n) for ref, n in counts.items() if int(n) > 1}

    def object(self, backend_id: str) -> dict[str, str]:
        return self.redis.hgetall(f"{self.prefix}:obj:{backend_id}")

    # -- the cloud's behaviour -------------------------------------------------------------------
    def now_ms(self) -> int:
        seconds, micros = self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def call(self, key: str, resource: Resource) -> SimulatedConfig:
        """Simulate the latency of one API call, then raise the injected failure if this one is chosen."""
        config = self.config()
        low, high = config.latency_ms
        if high > 0:
            time.sleep(random.uniform(low, high) / 1000)
        attempt = self.redis.incr(f"{self.prefix}:attempts:{key}:{resource.uuid}")
        if chosen(config.seed, key, resource.uuid, config.failures.get(key, 0.0)):
            raise BackendError(
                f"simulated cloud refused {key} for {resource.resource_type} {resource.name!r}: "
                f"injected failure (seed {config.seed})"
            )
        transient = config.transient_failures.get(key, 0.0)
        if attempt == 1 and chosen(config.seed, f"transient:{key}", resource.uuid, transient):
            raise BackendError(
                f"simulated cloud timed out on {key} for {resource.resource_type} {resource.name!r}: "
                "injected transient failure, a retry succeeds"
            )
        return config

    def create(self, resource: Resource, attributes: dict[str, Any]) -> Changes:
        config = self.call(f"{resource.resource_type}.create", resource)
        building, _ready, _erred = RUNTIME_STATES[resource.resource_type]
        ref_key = f"{self.prefix}:ref:{resource.ref}"
        backend_id = f"{resource.resource_type[:3]}-{resource.uuid[:12]}"
        boots = not chosen(
            config.seed,
            f"{resource.resource_type}.boot",
            resource.uuid,
            config.failures.get(f"{resource.resource_type}.boot", 0.0),
        )
        fields = {
            "type": resource.resource_type,
            "name": resource.name,
            "status": building,
            "ready_at": self.now_ms() + config.build_ms,
            "boots": int(boots),
            **{k: json.dumps(v) for k, v in attributes.items()},
        }
        # Idempotent and atomic, as a real cloud's create is to its caller: a repeated create of the same
        # resource returns the same object, and a caller killed (or a Redis lost) mid-create never leaves
        # the name taken without its object.
        created = self.redis.eval(
            _CREATE_ONCE,
            4,
            ref_key,
            f"{self.prefix}:obj:{backend_id}",
            f"{self.prefix}:creates:{resource.resource_type}",
            f"{self.prefix}:creates_by_ref",
            backend_id,
            resource.ref,
            *[item for pair in fields.items() for item in pair],
        )
        if not created:
            backend_id = self.redis.get(ref_key) or backend_id
            return {"backend_id": backend_id, "runtime_state": self._runtime_state(backend_id)}
        return {"backend_id": backend_id, "runtime_state": building}

    def _runtime_state(self, backend_id: str) -> str:
        obj = self.object(backend_id)
        if not obj:
            raise BackendNotFound(f"simulated cloud has no object {backend_id!r}")
        now = self.now_ms()
        if "gone_at" in obj and now >= int(obj["gone_at"]):
            raise BackendNotFound(f"simulated cloud object {backend_id!r} was deleted")
        building, ready, erred = RUNTIME_STATES[obj["type"]]
        if obj["status"] == building and now >= int(obj["ready_at"]):
            return ready if obj.get("boots", "1") == "1" else erred
        return obj["status"]

    def pull(self, resource: Resource) -> Changes:
        self.call(f"{resource.resource_type}.pull", resource)
        if not resource.backend_id:
            raise BackendNotFound(f"{resource.resource_type} {resource.name!r} has no backend id yet")
        return {"runtime_state": self._runtime_state(resource.backend_id)}

    def modify(self, resource: Resource, method: str, attributes: dict[str, Any]) -> Changes:
        config = self.call(f"{resource.resource_type}.{method}", resource)
        self._runtime_state(resource.backend_id)  # raises BackendNotFound when it is gone
        building, _ready, _erred = RUNTIME_STATES[resource.resource_type]
        self.redis.hset(
            f"{self.prefix}:obj:{resource.backend_id}",
            mapping={
                "status": building,
                "ready_at": self.now_ms() + config.build_ms,
                **{k: json.dumps(v) for k, v in attributes.items()},
            },
        )
        return {"runtime_state": building, **attributes}

    def delete(self, resource: Resource) -> Changes:
        config = self.call(f"{resource.resource_type}.delete", resource)
        key = f"{self.prefix}:obj:{resource.backend_id}"
        if resource.backend_id and self.redis.exists(key):
            # HSETNX: a repeated delete does not push the moment it is gone further out.
            self.redis.hsetnx(key, "gone_at", self.now_ms() + config.delete_ms)
            self.redis.hset(key, "status", "DELETING")
            return {"runtime_state": "DELETING"}
        return {"runtime_state": "DELETED"}

    def is_gone(self, resource: Resource) -> bool:
        self.call(f"{resource.resource_type}.is_gone", resource)
        key = f"{self.prefix}:obj:{resource.backend_id}"
        obj = self.redis.hgetall(key)
        if not resource.backend_id or not obj:
            return True
        if "gone_at" in obj and self.now_ms() >= int(obj["gone_at"]):
            self.redis.delete(key, f"{self.prefix}:ref:{resource.ref}")
            return True
        return False


class _SimulatedBackend(ResourceBackend[Any]):
    def __init__(self, cloud: SimulatedCloud | None = None) -> None:
        self.cloud = cloud or SimulatedCloud()

    def pull(self, resource: Any) -> Changes:
        return self.cloud.pull(resource)

    def update(self, resource: Any, updated_fields: list[str]) -> Changes:
        return self.cloud.modify(resource, "update", {f: getattr(resource, f) for f in updated_fields})

    def delete(self, resource: Any) -> Changes:
        return self.cloud.delete(resource)

    def is_gone(self, resource: Any) -> bool:
        return self.cloud.is_gone(resource)


class SimulatedInstanceBackend(_SimulatedBackend, InstanceBackend):
    healthy_runtime_states = frozenset({"ACTIVE"})

    def create(self, resource: Instance) -> Changes:
        return self.cloud.create(resource, {"flavor": resource.flavor})

    def resize(self, resource: Instance, flavor: str) -> Changes:
        return self.cloud.modify(resource, "resize", {"flavor": flavor})


class SimulatedVolumeBackend(_SimulatedBackend, VolumeBackend):
    healthy_runtime_states = frozenset({"available"})

    def create(self, resource: Volume) -> Changes:
        return self.cloud.create(resource, {"size_gb": resource.size_gb})

    def extend(self, resource: Volume, size_gb: int) -> Changes:
        return self.cloud.modify(resource, "extend", {"size_gb": size_gb})


register_backend("simulated", "instance", SimulatedInstanceBackend)
register_backend("simulated", "volume", SimulatedVolumeBackend)
