"""`pusa-admin`: manage the service's API keys in its job database.

    pusa-admin keys create --name alice [--role admin] [--max-concurrent-jobs 2] [--jobs-per-minute 10]
                           [--gpu-seconds-per-day 36000]
    pusa-admin keys list
    pusa-admin keys revoke key_0123456789abcdef

The database is ``--database``, else ``PUSA_DATABASE``, else the local profile's ``sqlite:///data/jobs.db``
(a PostgreSQL password comes from ``PGPASSWORD``). `create` prints the new key alone on stdout, once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from sqlalchemy.exc import SQLAlchemyError

from pusa_jobs.api_keys import ApiKey, KeyStore, Quotas
from pusa_jobs.db import open_database

DEFAULT_DATABASE = "sqlite:///data/jobs.db"


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _row(key: ApiKey) -> str:
    quotas = ", ".join(f"{name}={value:g}" for name, value in key.quotas if value is not None) or "defaults"
    state = f"revoked {_when(key.revoked_at)}" if key.revoked_at else "active"
    return f"{key.id}\t{key.name}\t{key.role}\t{_when(key.created_at)}\t{state}\t{quotas}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pusa-admin", description=__doc__.splitlines()[0])
    parser.add_argument("--database", default=os.environ.get("PUSA_DATABASE", DEFAULT_DATABASE),
                        help="the job database's URL (default: $PUSA_DATABASE or %(default)s)")
    keys = parser.add_subparsers(dest="group", required=True).add_parser("keys", help="API keys")
    commands = keys.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="make a key and print it (once)")
    create.add_argument("--name", required=True)
    create.add_argument("--role", choices=("user", "admin"), default="user")
    create.add_argument("--max-concurrent-jobs", type=int)
    create.add_argument("--jobs-per-minute", type=int)
    create.add_argument("--gpu-seconds-per-day", type=float)
    commands.add_parser("list", help="every key: id, name, role, created, state, quotas")
    revoke = commands.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("key_id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        quotas = Quotas(max_concurrent_jobs=args.max_concurrent_jobs, jobs_per_minute=args.jobs_per_minute,
                        gpu_seconds_per_day=args.gpu_seconds_per_day) if args.command == "create" else None
    except ValueError as exc:
        print(f"pusa-admin: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    try:
        store = KeyStore(open_database(args.database))
        if args.command == "create":
            key, secret = store.create(args.name, args.role, quotas)
            print(f"created {key.id} ({key.name}, {key.role}); the key is shown only now:", file=sys.stderr)
            print(secret)
        elif args.command == "list":
            for key in store.list():
                print(_row(key))
        elif not store.revoke(args.key_id):
            print(f"pusa-admin: no active key {args.key_id}", file=sys.stderr)
            return 1
        else:
            print(f"revoked {args.key_id}", file=sys.stderr)
    except SQLAlchemyError as exc:
        print(f"pusa-admin: database {args.database}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
