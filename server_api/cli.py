"""`facefl serve`: run the aggregation server with uvicorn."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from server_api import serving
from server_api.metrics import MULTIPROC_ENV


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--db", help="database URL (sets FACEFL_DATABASE_URL); SQLite file by default")
    p.add_argument("--data-dir", help="blob store directory (sets FACEFL_DATA_DIR)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (PostgreSQL for > 1)")
    p.add_argument("--dev", action="store_true", help="dev mode: default admin token and enrollment secret")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from server_api.settings import Settings

    if not 1 <= args.port <= 65535:
        raise SystemExit(f"error: --port must be in 1..65535, got {args.port}")
    if args.workers < 1:
        raise SystemExit("error: --workers must be >= 1")
    if args.db:
        os.environ["FACEFL_DATABASE_URL"] = args.db
    if args.data_dir:
        os.environ["FACEFL_DATA_DIR"] = args.data_dir
    if args.dev:
        os.environ["FACEFL_DEV_MODE"] = "1"
    try:
        settings = Settings()
    except ValidationError as exc:
        raise SystemExit(f"error: invalid settings:\n{exc}") from exc
    if args.workers > 1 and settings.database_url.startswith("sqlite"):
        # correct (WAL, BEGIN IMMEDIATE, busy timeout; rounds are claimed by compare-and-set), but the
        # workers queue on SQLite's single write lock across processes: use PostgreSQL to scale writes
        print(
            "warning: several workers on SQLite share one write lock; use PostgreSQL (--db "
            "postgresql://...) to scale writes",
            file=sys.stderr,
        )
    if args.workers > 1:
        # migrate once here rather than in each worker (concurrent migrators would also be safe: an
        # advisory lock on PostgreSQL, BEGIN IMMEDIATE on SQLite; this just avoids N-1 waits)
        from server_api.db import upgrade

        upgrade(settings.database_url)
        os.environ["FACEFL_MIGRATE_ON_START"] = "0"
        if not os.environ.get(MULTIPROC_ENV):
            _fresh_multiproc_dir(settings.data_dir / "prometheus")
    uvicorn.run(
        "server_api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        http=serving.HTTP,
        loop=serving.LOOP,
    )
    return 0


def _fresh_multiproc_dir(path: Path) -> None:
    """prometheus_client's multiprocess mode: every worker writes its values here and /metrics sums
    them. Set before the workers start (they inherit it); emptied first, as that mode requires."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(path.resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="facefl serve", description="Run the facefl aggregation server")
    add_arguments(parser)
    return run(parser.parse_args(argv))
