"""S3 plumbing: the settings that reach a bucket, URI checks, pyarrow's filesystem, credentials, and
errors named by the AWS SDK's codes. Credentials never appear here: every node takes them from its
own AWS chain."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

S3 = "s3://"
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's bucket naming rules
# The AWS SDK's error code in pyarrow's messages ("AWS Error SLOW_DOWN during GetObject operation"),
# and the HTTP status it adds for codes it does not name ("AWS Error UNKNOWN (HTTP status 503)").
_AWS_CODE = re.compile(r"AWS Error ([A-Z_]+)")
_HTTP_STATUS = re.compile(r"HTTP status (\d{3})")
_DENIED = {"ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "MISSING_AUTHENTICATION_TOKEN",
           "INVALID_CLIENT_TOKEN_ID", "UNRECOGNIZED_CLIENT", "INVALID_SIGNATURE", "INCOMPLETE_SIGNATURE",
           "REQUEST_EXPIRED"}
_SERVER = {"SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "THROTTLING", "REQUEST_TIMEOUT"}


class StorageError(Exception):
    """A storage location that cannot be used, described for the user (the config field named)."""


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3: endpoint, region, timeouts and retries (never credentials, which come from the
    AWS chain). The user sets them as `data.s3` (config.S3Config, whose defaults are these)."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    max_attempts: int = 6
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 60.0
    anonymous: bool = False

    @classmethod
    def of(cls, settings: Any) -> "S3Settings":
        """The plain settings of any object with these attributes (config.S3Config); None: defaults."""
        if settings is None or isinstance(settings, S3Settings):
            return settings or cls()
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


def check_s3_uri(uri: str, field: str) -> None:
    """Raise StorageError, naming field, unless uri is a plain s3://bucket/key (checked before any I/O)."""
    parts = urlsplit(uri)
    if parts.scheme != "s3":
        raise StorageError(f"{field}: {uri!r}: unsupported scheme {parts.scheme!r}; "
                           "use a local path or s3://bucket/prefix")
    if not parts.netloc or parts.query or parts.fragment or "@" in parts.netloc:
        raise StorageError(f"{field}: {uri!r} is not a valid s3://bucket/prefix URI")
    if not BUCKET_NAME.fullmatch(parts.netloc) or ".." in parts.netloc:
        raise StorageError(f"{field}: {uri!r}: {parts.netloc!r} is not a valid S3 bucket name (3-63 lowercase "
                           "letters, digits, dots and hyphens, starting and ending with a letter or digit)")
    if any(seg in ("..", ".") for seg in parts.path.split("/")):
        raise StorageError(f"{field}: {uri!r}: '.' and '..' segments are not allowed in S3 keys")


def s3_filesystem(s3: S3Settings | Any):
    """pyarrow's S3 filesystem: credentials from the AWS chain. The AWS SDK's standard retry strategy is
    the only retry layer: it retries throttling, 5xx and connection errors by their error codes, with
    backoff, at most s3.max_attempts requests per call."""
    from pyarrow import fs

    s3 = S3Settings.of(s3)
    kwargs = dict(region=s3.region, connect_timeout=s3.connect_timeout_s, request_timeout=s3.request_timeout_s,
                  retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=s3.max_attempts),
                  anonymous=s3.anonymous)
    if s3.endpoint_url:
        parts = urlsplit(s3.endpoint_url)
        kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    return fs.S3FileSystem(**kwargs)


def check_credentials(uri: str, s3: S3Settings | Any, field: str) -> None:
    """Raise StorageError, naming the URI, when the AWS chain (environment, shared files, profile,
    container or instance role) has no credentials; pyarrow would otherwise send unsigned requests.

    The check asks boto3's chain; pyarrow reads with the AWS C++ SDK's, which covers the same
    common sources but may differ on exotic ones (SSO, credential_process)."""
    if s3.anonymous:
        return
    import boto3

    if boto3.Session().get_credentials() is None:
        raise StorageError(f"{field}: {uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY, a profile, or an instance role; or data.s3.anonymous: true "
                           "for a public bucket)")


def s3_error(uri: str, err: Exception, field: str) -> StorageError:
    """A StorageError naming field and uri for an S3 error, classified by the AWS SDK's error code
    (never by matching words of the message, which may quote a key or a server's text)."""
    return StorageError(f"{field}: {uri}: {s3_reason(err)}")


def s3_reason(err: Exception) -> str:
    """Why an S3 request failed, for a message: by the AWS SDK's error code and the HTTP status."""
    text = str(err)
    code = (_AWS_CODE.search(text) or [None, ""])[1]
    status = int((_HTTP_STATUS.search(text) or [None, "0"])[1])
    if code in ("NO_SUCH_BUCKET",):
        why = "the bucket does not exist"
    elif code in ("NO_SUCH_KEY", "RESOURCE_NOT_FOUND") or status == 404:
        why = "no such object"
    elif code in _DENIED or status == 403:
        why = "access denied or no credentials (set them through the standard AWS chain: environment, profile, role)"
    elif code == "REQUEST_TIME_TOO_SKEWED":
        why = "this machine's clock is too far from the server's (sync it, e.g. with NTP)"
    elif code == "NETWORK_CONNECTION":
        why = "cannot connect to the endpoint (check data.s3.endpoint_url and data.s3.region)"
    elif code in _SERVER or status >= 500:
        shown = code if code and code != "UNKNOWN" else f"HTTP {status}"
        why = (f"the server kept failing ({shown}) after data.s3.max_attempts attempts; "
               "raise data.s3.max_attempts or retry later")
    elif status == 400:
        why = f"the server refused the request as malformed ({code or 'HTTP 400'}; check data.s3.endpoint_url)"
    else:
        why = f"{type(err).__name__} ({code or 'no AWS error code'})"
    return why


@functools.lru_cache(maxsize=8)
def cached_filesystem(s3: S3Settings):
    return s3_filesystem(s3)


@functools.lru_cache(maxsize=8)
def _s3_client(s3: S3Settings):
    """A boto3 S3 client with the same endpoint, region, timeouts, retries and credentials chain as
    s3_filesystem, for the one request pyarrow cannot make (see Location.write_new)."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config as BotoConfig

    config = BotoConfig(region_name=s3.region, connect_timeout=s3.connect_timeout_s, read_timeout=s3.request_timeout_s,
                        retries={"mode": "standard", "total_max_attempts": s3.max_attempts},
                        **({"signature_version": UNSIGNED} if s3.anonymous else {}))
    return boto3.session.Session().client("s3", endpoint_url=s3.endpoint_url, config=config)


def put_if_absent(uri: str, s3: S3Settings, data: bytes) -> bool:
    """Create the object at uri (s3://bucket/key) with data unless one exists: True if this call created
    it. A conditional PUT (If-None-Match: *), which pyarrow cannot send and boto3 can."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri.removeprefix(S3).partition("/")
    try:
        _s3_client(s3).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return True
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        # 412: the object exists; 409: another conditional write to it was under way (the caller looks again)
        if code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        raise StorageError(f"{uri}: could not create the object: {code or 'error'} (HTTP {status})") from None
    except BotoCoreError as e:
        raise StorageError(f"{uri}: could not create the object: {type(e).__name__}") from None
