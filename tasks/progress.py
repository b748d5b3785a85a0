"""Training's progress, as a person watching the terminal or the Prefect UI sees it."""

from __future__ import annotations

import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact

PROGRESS_KEY = "thermocal-training-progress"
# log lines reach the terminal and the UI this late at most (tasks.train.Reporter: why)
REPORT_DELAY = 0.2  # seconds


class TrainingProgress:
    """Training's log lines and a Prefect progress artifact, sent from a thread of their own.

    A log line costs a few ms to render and queue, an artifact update about 17 ms against a local
    server (far more on a loaded one): the loop only hands them to a Reporter. The artifact appears
    only once training has run for `every` seconds and then advances at most once per `every`
    seconds; a training shorter than that never needs one.
    """

    def __init__(self, epochs: int, every: float = 1.0, log=None):
        self.epochs, self.every, self._log = epochs, every, log
        self.artifact_id = None
        self.next_update = time.monotonic() + every
        from tasks.train import Reporter

        self.reporter = Reporter(delay=REPORT_DELAY)

    def log(self, line: str) -> None:
        self.reporter.call(self._log, line)

    def __call__(self, epoch: int) -> None:
        now = time.monotonic()
        if now < self.next_update:
            return
        self.reporter.call(self._publish, 100.0 * epoch / self.epochs)
        self.next_update = now + self.every

    def _publish(self, percent: float) -> None:
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(percent, key=PROGRESS_KEY, description="training epochs done (%)", _sync=True)
        else:
            update_progress_artifact(self.artifact_id, percent, _sync=True)

    def close(self) -> None:
        """Wait until every line and update handed over is sent."""
        self.reporter.close()

    def finish(self) -> None:
        self.close()
        if self.artifact_id is not None:
            self._publish(100.0)
