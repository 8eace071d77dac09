"""Connecting to Mooncake Store, or failing at startup with one clear message.

A :class:`MooncakeTarget` says what to connect to and mount (the serving side builds it from SGLang's
own Mooncake configuration: ``hcache_sglang.stores.mooncake_target``; the store imports no engine).
``connect`` checks what ``setup`` would otherwise retry for minutes or accept silently (master and
metadata server reachable; a segment that can hold one object), sets the client up, and proves it with
a probe object written, read back and removed. Any failure is one :class:`MooncakeConfigError` naming
the master, metadata server, protocol and segment size that were tried.
"""

from __future__ import annotations

import logging
import socket
import urllib.parse
import uuid
from dataclasses import dataclass

import torch

from .pool import aligned_buffer

logger = logging.getLogger(__name__)

_LOCAL_BUFFER_BYTES = 16 << 20  # Mooncake's copy buffer; the zero-copy calls used here need little
_REACH_TIMEOUT_S = 3.0


class MooncakeConfigError(RuntimeError):
    """Mooncake Store cannot be used as configured; the message names what was tried."""


@dataclass(frozen=True)
class MooncakeTarget:
    """What this server connects to and mounts (from SGLang's MooncakeStoreConfig)."""

    master: str  # host:port of mooncake_master's RPC service
    metadata_server: str  # http://host:port/metadata, or P2PHANDSHAKE
    protocol: str  # tcp | rdma | ...
    device_name: str
    local_hostname: str
    segment_bytes: int  # memory this server mounts into the store (0: none, beside store processes)

    def describe(self) -> str:
        mount = (f"mounts {self.segment_bytes >> 20} MiB" if self.segment_bytes
                 else "mounts nothing (memory held by store processes)")
        return (f"master {self.master}, metadata {self.metadata_server}, protocol {self.protocol}, "
                f"local {self.local_hostname}, {mount}")


def connect(target: MooncakeTarget, probe_bytes: int):
    """A set-up ``MooncakeDistributedStore`` that has stored and read back a ``probe_bytes`` object."""
    from mooncake.store import MooncakeDistributedStore

    def fail(why: str) -> MooncakeConfigError:
        return MooncakeConfigError(f"hcache backend mooncake: {why} (tried {target.describe()})")

    if 0 < target.segment_bytes < probe_bytes:
        raise fail(f"the segment ({target.segment_bytes} bytes) is smaller than one chunk object "
                   f"({probe_bytes} bytes); raise MOONCAKE_GLOBAL_SEGMENT_SIZE")
    _check_reachable(target.master, "mooncake_master RPC", fail)
    if target.metadata_server.startswith(("http://", "https://")):
        url = urllib.parse.urlsplit(target.metadata_server)
        _check_reachable(f"{url.hostname}:{url.port or 80}", "metadata server", fail)
    store = MooncakeDistributedStore()
    rc = store.setup(target.local_hostname, target.metadata_server, target.segment_bytes,
                     _LOCAL_BUFFER_BYTES, target.protocol, target.device_name, target.master)
    if rc != 0:
        raise fail(f"MooncakeDistributedStore.setup returned {rc} (an unknown protocol, a device "
                   "that does not exist, or a segment the host cannot allocate)")
    try:
        _probe(store, probe_bytes, fail)
    except BaseException:
        store.close()
        raise
    return store


def _check_reachable(address: str, what: str, fail) -> None:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), _REACH_TIMEOUT_S):
            pass
    except (OSError, ValueError) as exc:
        raise fail(f"{what} at {address!r} is unreachable ({exc})") from None


def _probe(store, nbytes: int, fail) -> None:
    """Put, read back and remove one object of the largest size this store writes."""
    key = f"hcache/probe/{uuid.uuid4().hex}"
    src = aligned_buffer(2 * nbytes)
    src[:nbytes] = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    dst = src[nbytes:]
    store.register_buffer(src.data_ptr(), len(src))
    try:
        rc = store.batch_put_from([key], [src.data_ptr()], [nbytes])[0]
        if rc != 0:
            raise fail(f"a {nbytes}-byte probe object could not be stored (code {rc}: no mounted "
                       "segment has room -- mount one with MOONCAKE_GLOBAL_SEGMENT_SIZE or start a "
                       "mooncake_client store process -- or the protocol cannot move bytes here)")
        got = store.batch_get_into([key], [dst.data_ptr()], [nbytes])[0]
        if got != nbytes or not torch.equal(src[:nbytes], dst):
            raise fail(f"a {nbytes}-byte probe object did not read back intact (code {got})")
        store.remove(key)
    finally:
        store.unregister_buffer(src.data_ptr())
