"""The tokviz exception family.

Every error a user can cause is a `TokvizError` whose message is one line: what was
wrong, with which value, and what to do. The CLI maps each class to an exit code.
"""


class TokvizError(Exception):
    """Base class of every error tokviz raises on purpose."""

    exit_code = 1


class SpecError(TokvizError):
    """A job spec is invalid; the job ends `rejected` with this message."""

    exit_code = 2

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ConfigError(TokvizError):
    """The command line or worker configuration is invalid."""

    exit_code = 2


class JobNotFoundError(TokvizError):
    """No job with the given id exists in the bucket."""

    exit_code = 3


class JobStateError(TokvizError):
    """The job is not in a state that allows the requested operation."""

    exit_code = 4


class JobFailedError(TokvizError):
    """A job that was waited for ended in a state other than `succeeded`."""

    exit_code = 5


class WaitTimeoutError(TokvizError):
    """A job did not reach a terminal state in the time given."""

    exit_code = 6


class StoreError(TokvizError):
    """An object store call failed."""

    exit_code = 7


class ObjectNotFoundError(StoreError):
    """The key does not exist."""


class PreconditionFailedError(StoreError):
    """A conditional write lost: the object exists, or its ETag changed."""


class AccessDeniedError(StoreError):
    """The credentials may not perform the call on this bucket or key."""


class BucketNotFoundError(StoreError):
    """The bucket does not exist."""


class StoreUnavailableError(StoreError):
    """The store kept failing with retryable errors until the retry budget ran out."""


class ModelLoadError(TokvizError):
    """A model or its tokenizer could not be found or loaded."""

    exit_code = 8


class AttributionError(TokvizError):
    """Inseq raised while attributing a job's inputs."""

    exit_code = 9


class LeaseLostError(TokvizError):
    """Another worker took over the job, so this worker must not commit results."""


class JobCancelledError(TokvizError):
    """A cancellation request reached the running job."""


class ComparisonError(TokvizError):
    """Jobs cannot be compared because their inputs or generated tokens differ."""

    exit_code = 2
