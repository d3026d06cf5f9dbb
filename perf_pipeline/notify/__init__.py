"""Notification channels: render alerts and failed runs, and send them to Slack or email.

Plain code with no Dagster import, so that it is tested directly against local servers;
`perf_pipeline/defs/` wraps the channels in Dagster resources. Every channel has a `name`,
`deliver_alert(alert)` and `deliver_run_failure(failure)`, and raises `DeliveryError` on any
failure, so the caller (a sensor draining the alert outbox) catches one exception type and
decides from `retryable` whether to try the row again later.

The channels live in `perf_pipeline.notify.slack` and `perf_pipeline.notify.email`; they are
not re-exported here because they import `DeliveryError` from this module.
"""

from __future__ import annotations

from typing import Protocol


class DeliveryError(Exception):
    """A notification that did not arrive: which channel, why, and whether to try again.

    The message never holds a secret (webhook URL, token, password): it ends up in Dagster
    logs and in the outbox's error column, which more people read than hold the secrets.
    """

    def __init__(self, channel: str, reason: str, *, retryable: bool,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{channel}: {reason}")
        self.channel = channel
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after  # seconds the receiver asked us to wait, when it said

    def __repr__(self) -> str:
        return (f"DeliveryError({self.channel!r}, {self.reason!r}, retryable={self.retryable}, "
                f"retry_after={self.retry_after})")


class NotificationChannel(Protocol):
    """What the caller needs from a channel, whichever it is."""

    name: str

    def deliver_alert(self, alert: dict) -> None: ...

    def deliver_run_failure(self, failure: dict) -> None: ...


__all__ = ["DeliveryError", "NotificationChannel"]
