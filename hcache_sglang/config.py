"""HCache configuration: parsed once, at the boundary, into a frozen dataclass.

The launcher (``hcache-sglang serve``, ``hcache_sglang.Engine``) turns its ``--hcache-*`` flags into
an :class:`HCacheConfig`, serialises it into SGLang's ``--unified-cache-external-linker-config``, and
the linker in the scheduler process parses it back with :meth:`HCacheConfig.from_dict`. Nothing below
the linker reads raw dictionaries.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


class HierarchicalCache(str, enum.Enum):
    """What ``--hierarchical-cache`` selects: three systems one flag apart."""

    OFF = "off"  # SGLang's plain radix cache: an evicted prefix is recomputed
    HICACHE = "hicache"  # SGLang's own HiCache: K/V pages offloaded to host + file storage
    HCACHE = "hcache"  # this package: hidden states on SSD, K/V re-projected on restore


class Objective(str, enum.Enum):
    """What the restore planner optimises for (``--hcache-objective``)."""

    SPEED = "speed"  # fastest restore, whatever it stores
    SPACE = "space"  # fewest bytes per token (hidden states where smaller than K+V)
    BALANCED = "balanced"  # fastest restore within ~the bytes of the space plan


class Backend(str, enum.Enum):
    """Where chunks live (``--hcache-backend``)."""

    LOCAL = "local"  # this server's file pool with its LMDB index
    MOONCAKE = "mooncake"  # Mooncake Store, shared by every server on one master


class LoadCheck(str, enum.Enum):
    """When stored bytes are verified against their checksums during a restore.

    EAGER reads and verifies every chunk before the restore is accepted, so a corrupt or missing chunk
    falls back to recomputation (SGLang treats a refused load as a miss). PIPELINED overlaps the reads
    with the projections and the forward; a chunk found corrupt mid-restore then fails its request
    (SGLang aborts it with 503; never a wrong answer) — for trusted storage where IO dominates.
    """

    EAGER = "eager"
    PIPELINED = "pipelined"


class RestoreOn(str, enum.Enum):
    """Which thread restores a loaded context into the KV pool.

    THREADS: the restore pipeline's own threads (readers, restorer, releaser), overlapping the reads
    and projections with the forward, which waits layer by layer. SCHEDULER: the scheduler thread,
    inside SGLang's ``load``: read, verify and restore every layer before the load is accepted (a
    failure at any step refuses it and SGLang recomputes). AUTO: SCHEDULER where the KV pool is in
    host memory (a CPU server: the forward and a restore share the same cores, so overlapping them
    buys nothing and the thread hand-offs cost more than the copies), THREADS on a GPU.
    """

    AUTO = "auto"
    SCHEDULER = "scheduler"
    THREADS = "threads"

    def inline(self, device: Any) -> bool:
        """Whether a restore into a KV pool on ``device`` runs on the scheduler thread."""
        if self is RestoreOn.AUTO:
            return torch_device_type(device) == "cpu"
        return self is RestoreOn.SCHEDULER


def torch_device_type(device: Any) -> str:
    return getattr(device, "type", None) or str(device).split(":")[0]


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"20G"``, ``"512MiB"``, ``"1.5T"``, ``"4096"`` -> bytes (binary multiples)."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        if not match:
            raise ValueError(f"cannot parse size {text!r}: expected e.g. 64G, 512MiB, 1.5T or bytes")
        number, unit, _ = match.groups()
        value = int(float(number) * (1024 ** "bkmgtp".index((unit or "b").lower())))
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"


def default_cache_root() -> Path:
    root = os.environ.get("HCACHE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hcache-sglang"
    )
    return Path(root)


def default_pool_dir() -> Path:
    return default_cache_root() / "pool"


def default_capacity(directory: str | Path) -> int:
    """Half of the free space on the pool's disk, at most 64 GiB, at least 256 MiB.

    A limit, not an allocation: the pool file grows to it as chunks are written, and only while the
    disk keeps its reserve free (checked again at every growth, ``backends.pool.FilePool.room``).
    """
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    return max(256 << 20, min(64 << 30, free // 2))


@dataclass(frozen=True)
class HCacheConfig:
    """Everything the HCache linker needs, validated.

    ``directory`` holds the chunk pool file(s) and the LMDB index beside them. ``layer_plan`` forces a
    plan (``"hidden"``, ``"kv"``, or per-layer letters such as ``"HHHK"``); ``None`` lets the planner
    choose under ``objective``.
    """

    directory: str
    capacity_bytes: int
    objective: Objective = Objective.BALANCED
    layer_plan: Optional[str] = None
    load_check: LoadCheck = LoadCheck.EAGER
    restore_on: RestoreOn = RestoreOn.AUTO
    staging_bytes: int = 256 << 20
    read_bandwidth_limit: Optional[float] = None  # bytes/s; emulates a slower disk (labelled)
    o_direct: bool = False
    refresh_profile: bool = False
    plan_tokens: int = 1000  # the restore length the planner plans for (see planner.PLAN_TOKENS)
    backend: Backend = Backend.LOCAL
    # Mooncake settings in SGLang's config keys (master_server_address, protocol, ...); None: read
    # SGLANG_HICACHE_MOONCAKE_CONFIG_PATH or the MOONCAKE_* variables, as SGLang's Mooncake backend does.
    mooncake: Optional[dict] = None
    # with backend mooncake: keep this server's local pool (directory, capacity_bytes) in front of
    # Mooncake as a cache: saves go to both, a restore reads the local copy when it holds every page
    local_cache: bool = False
    timeline_dir: Optional[str] = None  # write a restore timeline per sampled restore here (debug)
    timeline_every: int = 1  # sample every N-th restore into the timeline
    # re-plan from served restores: a verdict per this many restores that ran alone (0: keep the
    # startup plan; see hcache_sglang.calibration)
    replan_window: int = 8

    def __post_init__(self) -> None:
        if not self.directory:
            raise ValueError("hcache: the pool directory must not be empty")
        if self.capacity_bytes < (16 << 20):
            raise ValueError(
                f"hcache: capacity {self.capacity_bytes} bytes is too small; expected at least 16 MiB"
            )
        if self.staging_bytes < (1 << 20):
            raise ValueError(f"hcache: staging area {self.staging_bytes} bytes; expected >= 1 MiB")
        if self.read_bandwidth_limit is not None and self.read_bandwidth_limit <= 0:
            raise ValueError(
                f"hcache: read bandwidth limit must be positive, got {self.read_bandwidth_limit}"
            )
        if self.mooncake is not None and not isinstance(self.mooncake, dict):
            raise ValueError(f"hcache: mooncake config {self.mooncake!r}; expected a dict of SGLang's "
                             "Mooncake keys (master_server_address, protocol, ...) or None")
        if self.local_cache and self.backend is not Backend.MOONCAKE:
            raise ValueError("hcache: a local cache sits in front of a shared store: --hcache-local-cache "
                             f"needs --hcache-backend mooncake (got {self.backend.value})")
        if not isinstance(self.plan_tokens, int) or self.plan_tokens < 16:
            raise ValueError(f"hcache: plan tokens {self.plan_tokens!r}; expected an integer >= 16")
        if not isinstance(self.replan_window, int) or isinstance(self.replan_window, bool) or not (
                self.replan_window == 0 or self.replan_window >= 2):
            raise ValueError(f"hcache: re-plan window {self.replan_window!r}; expected 0 (off) or an integer >= 2")
        if not isinstance(self.timeline_every, int) or self.timeline_every < 1:
            raise ValueError(f"hcache: timeline_every {self.timeline_every!r}; expected an integer >= 1")
        if self.layer_plan is not None:
            plan = self.layer_plan.strip()
            if plan.lower() not in ("hidden", "kv") and not re.fullmatch(r"[HKR]+", plan):
                raise ValueError(
                    f"hcache: layer plan {self.layer_plan!r}; expected 'hidden', 'kv' or one letter "
                    "per layer from H (hidden states), K (stored K/V), R (recompute, leading layers)"
                )

    @classmethod
    def create(
        cls,
        directory: str | Path | None = None,
        capacity: str | int | None = None,
        **kwargs: Any,
    ) -> "HCacheConfig":
        """Build a config with the embedded defaults filled in (pool under the user cache dir,
        a capacity that fits the free disk)."""
        directory = str(Path(directory or default_pool_dir()).expanduser().resolve())
        capacity_bytes = parse_size(capacity) if capacity is not None else default_capacity(directory)
        if "staging" in kwargs:
            kwargs["staging_bytes"] = parse_size(kwargs.pop("staging"))
        for name, enum_type in (("objective", Objective), ("load_check", LoadCheck), ("backend", Backend),
                                ("restore_on", RestoreOn)):
            if isinstance(kwargs.get(name), str):
                kwargs[name] = _parse_enum(enum_type, kwargs[name], "--hcache-" + name.replace("_", "-"))
        return cls(directory=directory, capacity_bytes=capacity_bytes, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["objective"] = self.objective.value
        out["load_check"] = self.load_check.value
        out["backend"] = self.backend.value
        out["restore_on"] = self.restore_on.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HCacheConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"hcache config: unknown fields {sorted(unknown)}; known: {sorted(fields)}")
        data = dict(data)
        if "objective" in data:
            data["objective"] = _parse_enum(Objective, data["objective"], "objective")
        if "load_check" in data:
            data["load_check"] = _parse_enum(LoadCheck, data["load_check"], "load_check")
        if "backend" in data:
            data["backend"] = _parse_enum(Backend, data["backend"], "backend")
        if "restore_on" in data:
            data["restore_on"] = _parse_enum(RestoreOn, data["restore_on"], "restore_on")
        return cls(**data)


def _parse_enum(enum_type: type[enum.Enum], value: Any, what: str):
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(str(value).lower())
    except ValueError:
        choices = ", ".join(member.value for member in enum_type)
        raise ValueError(f"{what}: {value!r} is not one of {choices}") from None
