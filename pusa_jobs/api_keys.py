"""API keys: random bearer secrets, stored only as their SHA-256, each with a name, a role and
optional quotas of its own.

A key is ``pusa-`` and 43 characters of 256 random bits; a hash of that much entropy needs no salt
or slow hash. Requests carry it as ``Authorization: Bearer <key>``; the key's id owns the jobs it makes.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import insert, select, update

from .db import Database
from .schema import api_keys

Role = Literal["user", "admin"]
KEY_PREFIX = "pusa-"


class Quotas(BaseModel):
    """Per-key limits; None is no limit (for a key: the deployment's default)."""

    model_config = ConfigDict(extra="forbid")

    max_concurrent_jobs: int | None = Field(default=None, ge=1)  # queued + running
    jobs_per_minute: int | None = Field(default=None, ge=1)
    gpu_seconds_per_day: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    def over(self, defaults: Quotas) -> Quotas:
        """These quotas, each unset one taken from `defaults`."""
        return Quotas(**{name: getattr(defaults, name) if value is None else value for name, value in self})


class ApiKey(BaseModel):
    """A key as the database keeps it (without its secret)."""

    id: str
    name: str
    role: Role
    created_at: float
    revoked_at: float | None = None
    quotas: Quotas = Quotas()


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: a key's id and role, or the anonymous admin of a deployment without
    keys (which listens on loopback only)."""

    key_id: str
    role: Role
    quotas: Quotas

    @property
    def owner(self) -> str:
        return self.key_id

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_see(self, owner: str) -> bool:
        """Whether a job owned by `owner` exists for this caller (others' jobs are a 404)."""
        return self.is_admin or owner == self.key_id


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _key(row) -> ApiKey:
    quotas = Quotas(max_concurrent_jobs=row.max_concurrent_jobs, jobs_per_minute=row.jobs_per_minute,
                    gpu_seconds_per_day=row.gpu_seconds_per_day)
    return ApiKey(id=row.id, name=row.name, role=row.role, created_at=row.created_at, revoked_at=row.revoked_at,
                  quotas=quotas)


class KeyStore:
    """API keys in the job database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, name: str, role: Role = "user", quotas: Quotas | None = None) -> tuple[ApiKey, str]:
        """A new key; returns it and its secret, which is stored nowhere."""
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(id="key_" + secrets.token_hex(8), name=name, role=role, created_at=time.time(),
                     quotas=quotas or Quotas())
        with self.db.write() as conn:
            conn.execute(insert(api_keys).values(id=key.id, name=name, role=role, secret_hash=hash_secret(secret),
                                                 created_at=key.created_at, **key.quotas.model_dump()))
        return key, secret

    def list(self) -> list[ApiKey]:
        with self.db.read() as conn:
            return [_key(row) for row in conn.execute(select(api_keys).order_by(api_keys.c.created_at))]

    def revoke(self, key_id: str) -> bool:
        """Revoke the key `key_id` (at once, on every replica); False when there is no such live key."""
        with self.db.write() as conn:
            done = conn.execute(update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                                .values(revoked_at=time.time()))
        return done.rowcount == 1

    def authenticate(self, secret: str) -> ApiKey | None:
        """The live key whose secret this is, or None."""
        if not secret.startswith(KEY_PREFIX) or len(secret) > 128:
            return None
        with self.db.read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.secret_hash == hash_secret(secret),
                                                      api_keys.c.revoked_at.is_(None))).first()
        return None if row is None else _key(row)
