"""Slack channels: an incoming webhook (a URL is all it needs) or a bot token (through a
`slack_sdk.WebClient`, e.g. from dagster-slack's `SlackResource.get_client()`).

The webhook URL and the bot token are secrets: anyone holding them can post to the channel.
Neither appears in an error, a repr or a log line; errors are rebuilt from status codes and
Slack's error codes, and raised `from None` so that the library's exception (which may carry
the request, headers included) is not chained into Dagster's logs.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from perf_pipeline.notify import DeliveryError
from perf_pipeline.notify.messages import run_failure_slack_payload, slack_payload

# Slack Web API error codes that say "not now" rather than "never"
RETRYABLE_SLACK_ERRORS = frozenset({"ratelimited", "rate_limited", "internal_error", "fatal_error",
                                    "service_unavailable", "request_timeout"})
BODY_EXCERPT = 200


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Retry-After as seconds: either a number of seconds or an HTTP date (RFC 9110)."""
    if not headers:
        return None
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(str(value))
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, (moment - datetime.now(timezone.utc)).total_seconds())


def _retryable_status(status: int) -> bool:
    return status in (408, 429) or status >= 500


class _SlackChannel:
    """Renders with messages.py and hands the payload to `send_payload`."""

    name = "slack"

    def send_payload(self, payload: dict) -> None:
        raise NotImplementedError

    def deliver_alert(self, alert: dict) -> None:
        self.send_payload(slack_payload(alert))

    def deliver_run_failure(self, failure: dict) -> None:
        self.send_payload(run_failure_slack_payload(failure))


class SlackWebhookChannel(_SlackChannel):
    """Posts to a Slack incoming webhook with urllib: no dependency beyond the standard library."""

    name = "slack_webhook"

    def __init__(self, url: str, *, timeout: float = 10) -> None:
        # checked without echoing the URL: its path is the secret
        if not isinstance(url, str) or not url.lower().startswith(("https://", "http://")):
            raise ValueError("the Slack webhook URL must be an http(s) URL")
        self._url = url
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"SlackWebhookChannel(url='***', timeout={self.timeout})"

    def _fail(self, reason: str, *, retryable: bool, retry_after: float | None = None) -> DeliveryError:
        return DeliveryError(self.name, reason.replace(self._url, "***"), retryable=retryable,
                             retry_after=retry_after)

    def send_payload(self, payload: dict) -> None:
        """POST the payload; Slack answers 200 with the body "ok", anything else is a failure."""
        request = urllib.request.Request(
            self._url, data=json.dumps(payload).encode("utf-8"), method="POST",
            headers={"Content-Type": "application/json; charset=utf-8"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status, body = response.status, response.read(BODY_EXCERPT * 4)
        except urllib.error.HTTPError as error:
            body = _excerpt(error.read(BODY_EXCERPT * 4))
            raise self._fail(f"Slack answered HTTP {error.code}" + (f": {body}" if body else ""),
                             retryable=_retryable_status(error.code),
                             retry_after=retry_after_seconds(error.headers)) from None
        except urllib.error.URLError as error:
            raise self._fail(f"cannot reach Slack: {error.reason}", retryable=True) from None
        except (OSError, http.client.HTTPException) as error:  # timeouts, dropped connections
            raise self._fail(f"connection to Slack failed: {type(error).__name__}: {error}",
                             retryable=True) from None
        if not 200 <= status < 300 or body.strip() != b"ok":
            raise self._fail(f"Slack answered HTTP {status} with {_excerpt(body)!r} instead of 'ok'",
                             retryable=_retryable_status(status))


def _excerpt(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    return text if len(text) <= BODY_EXCERPT else text[:BODY_EXCERPT] + "…"


class SlackBotChannel(_SlackChannel):
    """Posts with a bot token through `client.chat_postMessage`; `client` is a slack_sdk
    WebClient, so tests and the Dagster resource can hand in one built however they like."""

    name = "slack_bot"

    def __init__(self, client, channel: str) -> None:
        if not channel:
            raise ValueError("SlackBotChannel needs a channel (a name like #perf-alerts or an id)")
        self._client = client
        self.channel = channel

    def __repr__(self) -> str:
        return f"SlackBotChannel(channel={self.channel!r})"

    def send_payload(self, payload: dict) -> None:
        from slack_sdk.errors import SlackApiError, SlackClientError

        try:
            self._client.chat_postMessage(channel=self.channel, text=payload.get("text", ""),
                                          blocks=payload.get("blocks"))
        except SlackApiError as error:
            raise self._api_failure(error.response) from None
        except SlackClientError as error:  # a client misconfiguration: retrying will not help
            raise DeliveryError(self.name, f"Slack client error: {type(error).__name__}",
                                retryable=False) from None
        except (OSError, http.client.HTTPException) as error:  # URLError is an OSError
            reason = getattr(error, "reason", error)
            raise DeliveryError(self.name, f"cannot reach Slack: {type(error).__name__}: {reason}",
                                retryable=True) from None

    def _api_failure(self, response) -> DeliveryError:
        """Built from the status and Slack's error code only: the response also holds the
        request, whose Authorization header carries the token."""
        status = int(getattr(response, "status_code", 0) or 0)
        data = getattr(response, "data", None)
        code = str(data.get("error", "unknown_error")) if isinstance(data, dict) else "unexpected_body"
        code = code if len(code) <= BODY_EXCERPT else code[:BODY_EXCERPT] + "…"  # non-JSON bodies
        retryable = code in RETRYABLE_SLACK_ERRORS or _retryable_status(status)
        return DeliveryError(self.name, f"chat.postMessage to {self.channel} failed: HTTP {status}, {code}",
                             retryable=retryable,
                             retry_after=retry_after_seconds(getattr(response, "headers", None)))
