"""The one layer through which every S3 call passes.

It translates S3 error codes into tokviz's named errors, lets botocore's standard
retry mode retry what is retryable (5xx, SlowDown, throttling, reset connections,
timeouts) a bounded number of times with capped backoff, and logs each call at debug
level without bodies or credentials.
"""

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime

from pipeline.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StoreError,
    StoreUnavailableError,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 6
CONNECT_TIMEOUT_SECONDS = 5
READ_TIMEOUT_SECONDS = 60
BODY_READ_ATTEMPTS = 3
# botocore keeps 10 connections per client by default; stay below it.
MAX_PARALLEL_UPLOADS = 6

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


@dataclass(frozen=True)
class StoredObject:
    """An object's body (empty for HEAD) with the metadata tokviz relies on."""

    key: str
    body: bytes
    etag: str
    size: int
    last_modified: datetime | None
    server_time: datetime | None

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass(frozen=True)
class ObjectInfo:
    """One entry of a listing."""

    key: str
    size: int
    etag: str
    last_modified: datetime


def make_client(endpoint_url: str | None = None, region: str | None = None, max_attempts: int = DEFAULT_MAX_ATTEMPTS):
    """Create an S3 client with bounded retries and timeouts.

    `endpoint_url` falls back to TOKVIZ_ENDPOINT_URL, then to boto3's own
    AWS_ENDPOINT_URL handling. Custom endpoints use path-style addressing, which
    every S3-compatible server understands.
    """
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get("TOKVIZ_ENDPOINT_URL") or None
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


class ObjectStore:
    """Typed access to one bucket through an injected boto3 S3 client."""

    def __init__(self, client, bucket: str):
        self.client = client
        self.bucket = bucket

    def get(self, key: str) -> StoredObject:
        """Read an object; a body that breaks off mid-read is fetched again, a bounded number of times.

        botocore retries a request until its response headers arrive; a connection that
        drops while the body streams fails after that, outside its retries.
        """
        from botocore.exceptions import BotoCoreError

        for attempt in range(1, BODY_READ_ATTEMPTS + 1):
            response = self._call("get_object", key, Bucket=self.bucket, Key=key)
            try:
                body = response["Body"].read()
            except BotoCoreError as exc:
                log.debug("s3 get_object body read failed (try %d of %d): %s", attempt, BODY_READ_ATTEMPTS, type(exc).__name__)
                if attempt == BODY_READ_ATTEMPTS:
                    raise StoreUnavailableError(f"Failed to read s3://{self.bucket}/{key}: the connection broke while reading the body {attempt} times; retry later") from exc
                continue
            return _stored(key, body, response)

    def get_json(self, key: str) -> tuple[dict, str]:
        stored = self.get(key)
        return stored.json(), stored.etag

    def head(self, key: str) -> StoredObject | None:
        try:
            response = self._call("head_object", key, Bucket=self.bucket, Key=key)
        except ObjectNotFoundError:
            return None
        return _stored(key, b"", response)

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def put(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        """Write an object, optionally only if absent or unchanged; return its new ETag."""
        params = {"Bucket": self.bucket, "Key": key, "Body": body, "ContentType": content_type}
        if if_none_match:
            params["IfNoneMatch"] = "*"
        if if_match is not None:
            params["IfMatch"] = if_match
        response = self._call("put_object", key, **params)
        return response.get("ETag", "")

    def put_many(self, uploads: list[tuple[str, bytes, str]]) -> None:
        """Write independent objects, given as (key, body, content type), at the same time.

        Each request waits mostly on the network, so a few threads cut a chunk's
        upload time to about that of its slowest object. The first error is raised
        once every upload has ended.
        """
        if len(uploads) <= 1:
            for key, body, content_type in uploads:
                self.put(key, body, content_type=content_type)
            return

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(len(uploads), MAX_PARALLEL_UPLOADS)) as pool:
            futures = [pool.submit(self.put, key, body, content_type=content_type) for key, body, content_type in uploads]
        for future in futures:
            future.result()

    def put_json(self, key: str, data: dict, **conditions) -> str:
        body = json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True).encode()
        return self.put(key, body, content_type="application/json", **conditions)

    def copy(self, source_key: str, target_key: str) -> None:
        """Copy an object inside the bucket without reading its body here."""
        source = {"Bucket": self.bucket, "Key": source_key}
        self._call("copy_object", target_key, Bucket=self.bucket, Key=target_key, CopySource=source)

    def delete(self, key: str) -> None:
        self._call("delete_object", key, Bucket=self.bucket, Key=key)

    def list(self, prefix: str, max_keys: int | None = None) -> Iterator[ObjectInfo]:
        """List objects under a prefix in key order, page by page."""
        params = {"Bucket": self.bucket, "Prefix": prefix}
        seen = 0
        while True:
            response = self._call("list_objects_v2", prefix, **params)
            for item in response.get("Contents", []):
                yield ObjectInfo(item["Key"], item["Size"], item.get("ETag", ""), item["LastModified"])
                seen += 1
                if max_keys is not None and seen >= max_keys:
                    return
            if not response.get("IsTruncated"):
                return
            params["ContinuationToken"] = response["NextContinuationToken"]

    def list_prefixes(self, prefix: str) -> Iterator[str]:
        """List the immediate "folders" under a prefix (S3 common prefixes)."""
        params = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
        while True:
            response = self._call("list_objects_v2", prefix, **params)
            for item in response.get("CommonPrefixes", []):
                yield item["Prefix"]
            if not response.get("IsTruncated"):
                return
            params["ContinuationToken"] = response["NextContinuationToken"]

    def check_bucket(self) -> None:
        """Fail fast with a clear message when the bucket is missing or not ours."""
        self._call("head_bucket", "", Bucket=self.bucket)

    def _call(self, operation: str, key: str, **params):
        from botocore.exceptions import BotoCoreError, ClientError

        log.debug("s3 %s bucket=%s key=%s", operation, self.bucket, key)
        try:
            return getattr(self.client, operation)(**params)
        except ClientError as exc:
            raise _translate(exc, operation, self.bucket, key) from exc
        except BotoCoreError as exc:
            raise StoreUnavailableError(
                f"Failed to {_verb(operation)} s3://{self.bucket}/{key}: {exc}; check the endpoint and network, then retry"
            ) from exc


def _stored(key: str, body: bytes, response: dict) -> StoredObject:
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    server_time = parsedate_to_datetime(headers["date"]) if "date" in headers else None
    return StoredObject(
        key=key,
        body=body,
        etag=response.get("ETag", ""),
        size=response.get("ContentLength", len(body)),
        last_modified=response.get("LastModified"),
        server_time=server_time,
    )


def _translate(exc, operation: str, bucket: str, key: str) -> StoreError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    where = f"s3://{bucket}/{key}"

    if code == "NoSuchBucket" or (operation == "head_bucket" and status == "404"):
        return BucketNotFoundError(f"Bucket {bucket!r} does not exist; create it or check --bucket and --endpoint-url")
    if code in _NOT_FOUND or status == "404":
        return ObjectNotFoundError(f"{where} does not exist")
    if code in _PRECONDITION or status in _PRECONDITION:
        return PreconditionFailedError(f"Conditional write to {where} lost: the object exists or changed")
    if code in _DENIED or status == "403":
        return AccessDeniedError(f"Access denied to {where} ({operation}); check the credentials' permissions on bucket {bucket!r}")
    return StoreUnavailableError(
        f"Failed to {_verb(operation)} {where}: {code or status} {error.get('Message', '')}".rstrip() + "; retry later"
    )


def _verb(operation: str) -> str:
    return {
        "get_object": "read",
        "head_object": "inspect",
        "put_object": "write",
        "delete_object": "delete",
        "list_objects_v2": "list",
        "head_bucket": "open bucket",
        "copy_object": "copy to",
    }.get(operation, operation)
