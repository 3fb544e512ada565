"""Small text helpers shared by the trusted side; each has exactly one home here."""
from __future__ import annotations

from pathlib import Path


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of an error (of the driver's error under an SQLAlchemy
    wrapper), or the error's type name when it says nothing."""
    orig = getattr(exc, "orig", None) or exc
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    text = lines[0] if lines else type(orig).__name__
    return text if limit is None else text[:limit]


def hide_password(url: str) -> str:
    """A database or broker URL fit to print: the password replaced by ***."""
    from sqlalchemy.engine import make_url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:   # noqa: BLE001 - not an SQLAlchemy URL: hide the whole userinfo
        head, sep, tail = url.partition("@")
        return ("***@" + tail) if sep and "://" in head else url


def sqlite_path(url) -> Path | None:
    """The file of an SQLite database URL (str or sqlalchemy URL); None for an
    in-memory database, a `file:` URI, another backend or a URL that does not parse."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    db = parsed.database or ""
    if db in ("", ":memory:") or db.startswith("file:") or parsed.query.get("mode") == "memory":
        return None
    return Path(db).expanduser()


def is_redis_url(url: str | None) -> bool:
    return bool(url) and str(url).startswith(("redis://", "rediss://"))
