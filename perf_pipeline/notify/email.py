"""Email channel: alerts and failed runs sent over SMTP with smtplib.

One connection per message: alerts are few, and a fresh connection needs no keep-alive or
reconnect logic. SMTP's own reply codes decide whether to retry (4xx: transient, 5xx:
permanent); a connection that fails is transient. The password never appears in an error or
a repr, and a password is never sent over an unencrypted connection.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage

from perf_pipeline.notify import DeliveryError
from perf_pipeline.notify.messages import email_message, run_failure_email

SECURITY_MODES = ("none", "starttls", "ssl")


def _reply_text(reply) -> str:
    text = reply.decode("utf-8", errors="replace") if isinstance(reply, bytes) else str(reply)
    return " ".join(text.split())[:200]


class EmailChannel:
    """Sends email through one SMTP server: `security` is "none", "starttls" (upgrade after
    connecting, usually port 587) or "ssl" (TLS from the start, usually port 465)."""

    name = "email"

    def __init__(self, host: str, port: int, *, security: str = "none", user: str | None = None,
                 password: str | None = None, sender: str, recipients: list[str], timeout: float = 10,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if security not in SECURITY_MODES:
            raise ValueError(f"email security must be one of {', '.join(SECURITY_MODES)}, not {security!r}")
        if user and security == "none":
            raise ValueError("email security 'none' would send the SMTP password unencrypted: "
                             "use 'starttls' or 'ssl' with a user")
        if not recipients:
            raise ValueError("email recipients must name at least one address")
        self.host, self.port, self.security = host, int(port), security
        self.user, self._password = user, password
        self.sender, self.recipients, self.timeout = sender, list(recipients), timeout
        # built here, not per message: loading the system's CA store takes a while
        self._ssl_context = ssl_context if ssl_context is not None else (
            ssl.create_default_context() if security != "none" else None)

    def __repr__(self) -> str:
        password = "'***'" if self._password else None
        return (f"EmailChannel(host={self.host!r}, port={self.port}, security={self.security!r}, "
                f"user={self.user!r}, password={password}, sender={self.sender!r}, "
                f"recipients={self.recipients!r})")

    def deliver_alert(self, alert: dict) -> None:
        self.send_message(email_message(alert, sender=self.sender, recipients=self.recipients))

    def deliver_run_failure(self, failure: dict) -> None:
        self.send_message(run_failure_email(failure, sender=self.sender, recipients=self.recipients))

    def send_message(self, message: EmailMessage) -> None:
        """Send one message; envelope sender and recipients come from its From/To/Cc headers."""
        try:
            with self._connect() as smtp:
                if self.security == "starttls":
                    smtp.starttls(context=self._ssl_context)
                if self.user:
                    smtp.login(self.user, self._password or "")
                smtp.send_message(message)
        except Exception as error:  # every failure becomes one DeliveryError, password-free
            raise self._failure(error) from None

    def _connect(self) -> smtplib.SMTP:
        if self.security == "ssl":
            return smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=self._ssl_context)
        return smtplib.SMTP(self.host, self.port, timeout=self.timeout)

    def _failure(self, error: Exception) -> DeliveryError:
        reason, retryable = _classify(error)
        if self._password:
            reason = reason.replace(self._password, "***")
        return DeliveryError(self.name, f"{self.host}:{self.port}: {reason}", retryable=retryable)


def _classify(error: Exception) -> tuple[str, bool]:
    """A reason and whether to retry: 4xx replies and lost connections are transient; 5xx
    replies, certificate failures and missing server features need a person."""
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in error.recipients.values()]
        refused = ", ".join(f"{rcpt} ({code} {_reply_text(reply)})"
                            for rcpt, (code, reply) in error.recipients.items())
        return f"recipients refused: {refused}", any(400 <= code < 500 for code in codes)
    if isinstance(error, smtplib.SMTPAuthenticationError):
        return (f"login refused: {error.smtp_code} {_reply_text(error.smtp_error)}",
                400 <= error.smtp_code < 500)
    if isinstance(error, smtplib.SMTPResponseException):
        return (f"server answered {error.smtp_code} {_reply_text(error.smtp_error)}",
                400 <= error.smtp_code < 500)
    if isinstance(error, smtplib.SMTPServerDisconnected):
        return f"server closed the connection: {error}", True
    if isinstance(error, smtplib.SMTPException):  # e.g. STARTTLS or AUTH not offered
        return f"{type(error).__name__}: {error}", False
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate rejected: {error.verify_message}", False
    if isinstance(error, OSError):  # refused, reset, timed out, TLS handshake cut short
        return f"connection failed: {type(error).__name__}: {error}", True
    return f"{type(error).__name__}: {error}", False
