"""Object store faults injected into a boto3 client through botocore's event hooks.

`FaultInjector` fails a chosen share of S3 requests instead of sending them, the way a
throttled or flaky store does. The kinds are 500 InternalError, 503 SlowDown, a read
timeout, a reset connection, a GET whose body breaks off mid-read, and a response lost
after the store applied the request. The last is the worst case for conditional writes,
because their retry then finds the earlier write. botocore's retry machinery
handles these exactly as it would real faults, because they enter at the same place.
"""

import random
import threading
from collections import Counter

TRANSIENT_FAULTS = ("internal-error", "slow-down", "timeout", "reset", "broken-body", "lost-response")

_ERROR_XML = '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'


class FaultInjector:
    """Fail a share of one client's S3 requests with the given kinds of fault."""

    def __init__(self, client, share: float, kinds=TRANSIENT_FAULTS, seed: int = 0, operations: tuple[str, ...] | None = None, url_contains: str | None = None):
        self.client = client
        self.share = share
        self.kinds = tuple(kinds)
        self.operations = operations
        self.url_contains = url_contains
        self.random = random.Random(seed)
        self.injected = Counter()
        self.sent = Counter()
        self._lock = threading.Lock()
        self._real_session = None
        client.meta.events.register("before-send.s3", self._before_send)

    def remove(self) -> None:
        self.client.meta.events.unregister("before-send.s3", self._before_send)

    def _before_send(self, request, event_name: str, **kwargs):
        operation = event_name.rsplit(".", 1)[-1]
        with self._lock:
            self.sent[operation] += 1
            if self.operations is not None and operation not in self.operations:
                return None
            if self.url_contains is not None and self.url_contains not in request.url:
                return None
            if self.random.random() >= self.share:
                return None
            kind = self.random.choice(self._kinds_for(operation))
            self.injected[kind] += 1
        return self._fail(kind, request)

    def _kinds_for(self, operation: str) -> tuple[str, ...]:
        # A body can only break off where the caller streams it.
        kinds = tuple(kind for kind in self.kinds if kind != "broken-body" or operation == "GetObject")
        return kinds or ("internal-error",)

    def _fail(self, kind: str, request):
        from botocore.exceptions import ConnectionClosedError, ReadTimeoutError

        if kind == "internal-error":
            return _error_response(request, 500, "InternalError", "We encountered an internal error. Please try again.")
        if kind == "access-denied":
            return _error_response(request, 403, "AccessDenied", "Access Denied")
        if kind == "slow-down":
            return _error_response(request, 503, "SlowDown", "Please reduce your request rate.")
        if kind == "timeout":
            raise ReadTimeoutError(endpoint_url=request.url, error="injected read timeout")
        if kind == "reset":
            raise ConnectionClosedError(endpoint_url=request.url)
        if kind == "broken-body":
            return self._broken_body(request)
        if kind == "lost-response":
            self._send_for_real(request)
            raise ConnectionClosedError(endpoint_url=request.url)
        raise ValueError(f"unknown fault kind {kind!r}")

    def _send_for_real(self, request):
        from botocore.httpsession import URLLib3Session

        if self._real_session is None:
            self._real_session = URLLib3Session()
        return self._real_session.send(request)

    def _broken_body(self, request):
        """Send the GET, keep its headers, and break the body off after the first bytes."""
        from botocore.awsrequest import AWSResponse

        real = self._send_for_real(request)
        if real.status_code != 200:
            return real
        return AWSResponse(request.url, real.status_code, dict(real.headers), _BrokenStream(real.content[:3]))


class _BrokenStream:
    """A response stream that yields a few bytes, then fails like a dropped connection."""

    def __init__(self, head: bytes):
        self.head = head
        self.sent_head = False

    def read(self, amt=None, **kwargs):
        from urllib3.exceptions import ProtocolError

        if not self.sent_head:
            self.sent_head = True
            return self.head
        raise ProtocolError("Connection broken: injected reset while reading the body")

    def stream(self, **kwargs):
        yield self.read()
        self.read()

    def close(self):
        pass

    def release_conn(self):
        pass


class _Raw:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **kwargs):
        yield self.body


def _error_response(request, status: int, code: str, message: str):
    from botocore.awsrequest import AWSResponse

    body = _ERROR_XML.format(code=code, message=message).encode()
    headers = {"Content-Type": "application/xml", "Content-Length": str(len(body))}
    return AWSResponse(request.url, status, headers, _Raw(body))


class ScaledBackoff:
    """Stand-in for the `time` module inside botocore.endpoint: retry waits shrink, counts stay.

    The tests record each wait that botocore requests, then sleep only a fraction of it, so a
    run with hundreds of injected faults stays fast while the waits remain checkable.
    """

    def __init__(self, real_time, factor: float = 0.02):
        self._real_time = real_time
        self.factor = factor
        self.waits: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self._real_time.sleep(seconds * self.factor)

    def __getattr__(self, name):
        return getattr(self._real_time, name)
