"""Webhooks: `video.completed`, `video.failed` and `video.cancelled`, delivered at least once.

The transaction that ends a job also writes its delivery into the ``webhook_deliveries`` outbox, so an
event is never lost between the job's end and the call. Every runner replica sends what is due: it claims
one delivery at a time (a short lock in the row, skipped by other claimers), POSTs the JSON body signed
per the Standard Webhooks spec (``webhook-id``, ``webhook-timestamp``, ``webhook-signature: v1,<HMAC>``,
the headers `standardwebhooks` and `openai`'s ``client.webhooks.unwrap()`` verify) and on any failure
tries again after a doubling delay, until ``max_attempts``. The id stays the same across attempts, so a
receiver can drop duplicates. The body has OpenAI's event shape:
``{"id", "object": "event", "type", "created_at", "data": {"id": <video id>}}``. A request's own
``webhook_url`` must resolve to public addresses, when it is accepted and again before each attempt, and each
attempt connects to the address that passed (no second lookup a DNS rebinding could answer otherwise), so
nobody can make the cluster call its own private services or a cloud's metadata endpoint.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import secrets
import socket
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict
from sqlalchemy import and_, delete, or_, select, update
from standardwebhooks import Webhook

from .db import Database, db_now
from .schema import webhook_deliveries as deliveries

logger = logging.getLogger("ray.serve")

EVENT_TYPES = {"completed": "video.completed", "failed": "video.failed", "cancelled": "video.cancelled"}


def public_address(url: str) -> tuple[str | None, str | None]:
    """``(address, None)``: the address to call `url` at, when every address its host resolves to is public;
    ``(None, why)`` when it does not resolve or one is not (loopback, private, link-local such as cloud
    metadata, reserved)."""
    parts = urlsplit(url)
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                   proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, ValueError):
        return None, f"cannot resolve {parts.hostname}"
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses:
        if not address.is_global:
            return None, f"{parts.hostname} resolves to {address}, which is not a public address"
    return (str(addresses[0]), None) if addresses else (None, f"cannot resolve {parts.hostname}")


def receiver_problem(url: str) -> str | None:
    """Why `url` may not receive a request's webhooks (`public_address`), or None."""
    return public_address(url)[1]


def pinned(url: str, address: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """`url` aimed at `address`, the one its host was checked to resolve to, with the host kept in the
    ``Host`` header and as the TLS server name (so the certificate is still checked against it): a second
    lookup when connecting, which a DNS rebinding answers with a private address, never happens. Returns
    the URL, the headers and httpx's request extensions."""
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = host + (f":{parts.port}" if parts.port else "")
    host_header = parts.hostname + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl(), {"host": host_header}, {"sni_hostname": parts.hostname}


class WebhookSettings(BaseModel):
    """App arg ``webhooks``. The signing secret (``whsec_`` + base64, as Standard Webhooks and OpenAI
    use) comes from the environment variable `signing_key_env`, never from the config file."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = None  # receiver of every job's events, unless a request names its own
    signing_key_env: str = "PUSA_WEBHOOK_SECRET"
    max_attempts: int = 10
    backoff_s: float = 5.0  # before the second attempt; doubled for each further one
    backoff_max_s: float = 3600.0
    timeout_s: float = 10.0
    # A request's own webhook_url may resolve to loopback, private or link-local addresses (tests, a
    # trusted network); the config's `url` always may.
    allow_private_receivers: bool = False

    def secret(self) -> str | None:
        return os.environ.get(self.signing_key_env) or None


def delivery(job_id: str, status: str, url: str) -> dict[str, Any]:
    """The outbox row announcing that job `job_id` ended with `status`."""
    now = time.time()
    event_id = f"evt_{secrets.token_hex(12)}"
    payload = {"id": event_id, "object": "event", "type": EVENT_TYPES[status], "created_at": int(now),
               "data": {"id": job_id}}
    return {"id": event_id, "job_id": job_id, "event_type": EVENT_TYPES[status], "url": url,
            "payload": json.dumps(payload, separators=(",", ":")), "state": "pending", "attempts": 0,
            "created_at": now, "next_attempt_at": now}


def signed_headers(secret: str, msg_id: str, body: str, timestamp: float | None = None) -> dict[str, str]:
    """The Standard Webhooks headers for `body` sent as message `msg_id` at `timestamp` (default now)."""
    sent = datetime.fromtimestamp(time.time() if timestamp is None else timestamp, tz=timezone.utc)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(sent.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, sent, body),
        "content-type": "application/json",
    }


class WebhookSender:
    """Sends the due deliveries of the outbox in `db`, signed with `secret`."""

    def __init__(self, db: Database, settings: WebhookSettings, secret: str) -> None:
        self.db, self.settings, self.secret = db, settings, secret

    def _claim(self) -> Any:
        now = db_now()
        due = and_(deliveries.c.state == "pending", deliveries.c.next_attempt_at <= now,
                   or_(deliveries.c.locked_until.is_(None), deliveries.c.locked_until < now))
        oldest = (select(deliveries.c.id).where(due).order_by(deliveries.c.next_attempt_at).limit(1)
                  .with_for_update(skip_locked=True).scalar_subquery())
        stmt = (update(deliveries).where(deliveries.c.id == oldest, due)
                .values(locked_until=now + 2 * self.settings.timeout_s + 5, attempts=deliveries.c.attempts + 1)
                .returning(*deliveries.c))
        with self.db.write() as conn:
            return conn.execute(stmt).first()

    def _settle(self, row: Any, error: str | None) -> None:
        s = self.settings
        if error is None:
            values = {"state": "delivered", "delivered_at": time.time(), "locked_until": None, "last_error": None}
        elif row.attempts >= s.max_attempts:
            values = {"state": "failed", "locked_until": None, "last_error": error}
        else:
            delay = min(s.backoff_s * 2 ** (row.attempts - 1), s.backoff_max_s)
            values = {"next_attempt_at": time.time() + delay, "locked_until": None, "last_error": error}
        with self.db.write() as conn:
            conn.execute(update(deliveries).where(deliveries.c.id == row.id).values(**values))

    async def send_due(self, client: httpx.AsyncClient) -> int:
        """Send every delivery that is due now; returns how many were attempted."""
        sent = 0
        while (row := await asyncio.to_thread(self._claim)) is not None:
            screened = row.url != self.settings.url and not self.settings.allow_private_receivers
            url, headers, extensions, error = row.url, {}, {}, None
            if screened:  # resolved anew for each attempt, and called at the address that passed
                address, error = await asyncio.to_thread(public_address, row.url)
                if address is not None:
                    url, headers, extensions = pinned(row.url, address)
            try:
                if error is None:
                    response = await client.post(url, content=row.payload, timeout=self.settings.timeout_s,
                                                 headers={**signed_headers(self.secret, row.id, row.payload), **headers},
                                                 extensions=extensions)
                    error = None if response.is_success else f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            if error:
                logger.warning("webhook %s to %s, attempt %d: %s", row.id, row.url, row.attempts, error)
            await asyncio.to_thread(self._settle, row, error)
            sent += 1
        return sent

    def forget_settled(self, older_than_s: float) -> int:
        """Remove delivered and failed deliveries older than `older_than_s`; returns how many."""
        stmt = delete(deliveries).where(deliveries.c.state != "pending",
                                        deliveries.c.created_at < time.time() - older_than_s)
        with self.db.write() as conn:
            return conn.execute(stmt).rowcount
