"""Local Mooncake processes for tests and benchmarks: ``mooncake_master`` and ``mooncake_client`` stores.

Everything listens on 127.0.0.1 ports picked free at start (``MC_TCP_BIND_ADDRESS=127.0.0.1`` keeps
the transfer engine off the LAN too); ``stop`` ends the process group, so nothing outlives a test.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")  # this process's clients too


def _binary(name: str) -> str:
    import mooncake

    return str(Path(mooncake.__file__).parent / name)


def free_port(low: int = 20000, high: int = 30000) -> int:
    """A free port outside the ephemeral range (one the OS handed out could be taken again before the
    process binds it)."""
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"port {port} of {proc.args[0]} not open after {timeout}s")


class _Proc:
    def __init__(self, log: Path):
        self.log = log
        self.proc: subprocess.Popen | None = None

    def _spawn(self, args: list[str]) -> subprocess.Popen:
        env = dict(os.environ, MC_TCP_BIND_ADDRESS="127.0.0.1")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        return self.proc

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class MooncakeMaster(_Proc):
    """``mooncake_master`` with its HTTP metadata server, on free loopback ports."""

    def __init__(self, workdir: Path):
        super().__init__(workdir / "mooncake_master.log")
        self.rpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.address = f"127.0.0.1:{self.rpc_port}"
        self.metadata = f"http://127.0.0.1:{self.http_port}/metadata"

    def start(self) -> "MooncakeMaster":
        proc = self._spawn([_binary("mooncake_master"), "--enable_http_metadata_server=true",
                            "--http_metadata_server_host=127.0.0.1",
                            f"--http_metadata_server_port={self.http_port}",
                            "--rpc_address=127.0.0.1", f"--rpc_port={self.rpc_port}",
                            "--metrics_host=127.0.0.1", f"--metrics_port={self.metrics_port}"])
        for port in (self.rpc_port, self.http_port, self.metrics_port):
            _wait_port(port, proc, self.log)
        return self

    def restart(self) -> None:
        self.stop()
        self.start()

    def metric(self, name: str) -> float:
        """One gauge from the master's own Prometheus accounting (e.g. ``master_key_count``)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read()
        for line in text.decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def keys(self) -> list[str]:
        """Every key the master holds (its admin endpoint ``/get_all_keys``)."""
        url = f"http://127.0.0.1:{self.metrics_port}/get_all_keys"
        return urllib.request.urlopen(url, timeout=5).read().decode().split()

    def config(self, segment_bytes: int = 0) -> dict:
        """SGLang's Mooncake config dict for a client of this master."""
        return {"master_server_address": self.address, "metadata_server": self.metadata,
                "protocol": "tcp", "global_segment_size": segment_bytes, "local_hostname": "127.0.0.1"}

    def env(self, segment_bytes: int = 0) -> dict[str, str]:
        """The same as ``MOONCAKE_*`` variables (what a server process reads)."""
        return {"MOONCAKE_MASTER": self.address, "MOONCAKE_TE_META_DATA_SERVER": self.metadata,
                "MOONCAKE_PROTOCOL": "tcp", "MOONCAKE_GLOBAL_SEGMENT_SIZE": str(segment_bytes),
                "MOONCAKE_LOCAL_HOSTNAME": "127.0.0.1", "MC_TCP_BIND_ADDRESS": "127.0.0.1"}


class MooncakeStoreProcess(_Proc):
    """A standalone ``mooncake_client`` holding ``megabytes`` of store memory for the master."""

    def __init__(self, master: MooncakeMaster, workdir: Path, megabytes: int = 256):
        super().__init__(workdir / f"mooncake_client_{free_port()}.log")
        self.master, self.megabytes, self.port = master, megabytes, free_port()

    def start(self) -> "MooncakeStoreProcess":
        before = self.master.metric("master_total_capacity_bytes")
        proc = self._spawn([_binary("mooncake_client"),
                            f"-master_server_address={self.master.address}",
                            f"-metadata_server={self.master.metadata}",
                            f"-global_segment_size={self.megabytes} MB", "-host=127.0.0.1",
                            f"-port={self.port}", "-protocol=tcp"])
        _wait_port(self.port, proc, self.log)
        deadline = time.monotonic() + 30
        while self.master.metric("master_total_capacity_bytes") <= before:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"mooncake_client never mounted its segment: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        return self
