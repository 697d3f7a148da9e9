"""The polling worker loop: `tokviz worker` and container workers run this.

The loop polls the inbox and the queue, keeps loaded models warm between jobs, and
stops cleanly on SIGINT or SIGTERM: the job in progress finishes its current chunk
boundary check, then the loop exits instead of starting another job. The jobs of a
batch were attributed together, so all of them finish before the loop exits.
"""

import logging
import signal
import threading
from dataclasses import dataclass

from pipeline.errors import StoreError
from pipeline.worker import Worker

log = logging.getLogger(__name__)


@dataclass
class LoopSettings:
    """How long and how often the loop polls."""

    poll_seconds: float = 5.0
    once: bool = False
    max_jobs: int | None = None
    max_idle_seconds: float | None = None


class WorkerLoop:
    """Runs `Worker.poll_once` until stopped."""

    def __init__(self, worker: Worker, settings: LoopSettings):
        self.worker = worker
        self.settings = settings
        self.stop_event = threading.Event()
        self.jobs_done = 0

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def run(self) -> int:
        """Poll until stopped, `--once` or `--max-jobs` is reached; return jobs run."""
        ids = {"worker_id": self.worker.config.worker_id}
        log.info("worker started on s3://%s/%s", self.worker.store.bucket, self.worker.layout.prefix, extra=ids)
        idle_seconds = 0.0

        while not self.stop_event.is_set():
            remaining = None if self.settings.max_jobs is None else self.settings.max_jobs - self.jobs_done
            try:
                outcomes = self._poll(remaining)
            except StoreError as exc:
                log.error("poll failed: %s", exc, extra=ids)
                outcomes = []

            self.jobs_done += len(outcomes)
            if self._finished(outcomes):
                break

            idle_seconds = 0.0 if outcomes else idle_seconds + self.settings.poll_seconds
            if self.settings.max_idle_seconds is not None and idle_seconds >= self.settings.max_idle_seconds:
                log.info("no work for %.0f s; stopping", idle_seconds, extra=ids)
                break
            if not outcomes:
                self.stop_event.wait(self.settings.poll_seconds)

        log.info("worker stopped after %d jobs", self.jobs_done, extra=ids)
        return self.jobs_done

    def _poll(self, remaining: int | None):
        if self.stop_event.is_set():
            return []
        # A pass runs at most one batch's worth of jobs, and poll_once checks the stop
        # event between jobs and batches, so a stop request is honoured there.
        batch = max(self.worker.config.max_batch_jobs, 1)
        limit = batch if remaining is None else min(batch, remaining)
        return self.worker.poll_once(max_jobs=limit, stop=self.stop_event)

    def _finished(self, outcomes) -> bool:
        if self.settings.max_jobs is not None and self.jobs_done >= self.settings.max_jobs:
            return True
        return self.settings.once and not outcomes

    def _on_signal(self, signum, frame) -> None:
        log.info("received %s; stopping after the current job", signal.Signals(signum).name)
        self.stop_event.set()
