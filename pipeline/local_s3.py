"""A throwaway S3 server on 127.0.0.1 (moto's server mode) in a child process.

Used by `tokviz local-s3`, `tokviz demo` and the tests. moto keeps everything in
memory, so its data is gone when the process stops.
"""

import os
import socket
import subprocess
import sys
import time

from pipeline.errors import ConfigError

LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process(process: subprocess.Popen | None, timeout: float) -> None:
    """Terminate a child process, and kill it if it has not exited after `timeout` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class LocalS3:
    """Start, use and stop a moto server bound to 127.0.0.1."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "LocalS3":
        try:
            import moto.server  # noqa: F401 - only checks that the server extra is installed
        except ImportError as exc:
            raise ConfigError("moto's server is not installed; run 'pip install \"tokviz[server]\"'") from exc

        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **LOCAL_CREDENTIALS})
        self._wait_until_listening(timeout)
        return self

    def stop(self) -> None:
        stop_process(self.process, timeout=10)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")

    def create_bucket(self, name: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as exc:
            raise ConfigError(f"Failed to create bucket {name!r}: {str(exc.response['Error'].get('Message', '')).rstrip('.')}; use 3-63 lowercase letters, digits, '.' or '-'") from exc

    def reset(self) -> None:
        """Drop every bucket and object (moto's reset endpoint)."""
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST"), timeout=10).read()

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_until_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"The moto server exited at start (code {self.process.returncode}); is port {self.port} in use?")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise ConfigError(f"The moto server did not start listening on 127.0.0.1:{self.port} within {timeout:g} s")
