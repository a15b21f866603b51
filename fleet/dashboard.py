"""The fleet's web dashboard: a single page of plain HTML, JavaScript and CSS in fleet/static, served
by the HTTP API (edgeops.fleet.api) at / and /ui/<name>. An operator signs in with a token (checked
with GET /v1/whoami, kept in the tab's sessionStorage, sent as `Authorization: Bearer`); the page
reads the GET endpoints, the audit log included, and offers rollout actions only to the operator
and admin roles (the API refuses them to a viewer anyway); it loads nothing from anywhere else.

Invariants: `asset` serves only regular files directly inside fleet/static, named by 1-100 letters,
digits, '.', '_' or '-' not starting with '.', with a known content type; any other path is None.
`HEADERS` go with every asset: the page may load and fetch only from the fleet itself.
"""

from __future__ import annotations

import re
from pathlib import Path

STATIC = Path(__file__).parent / "static"
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def asset(path: str) -> tuple[str, bytes] | None:
    """(content type, bytes) of the dashboard file for a request path ("/" or "/ui/<name>", without
    the query string); None when the path names no dashboard file."""
    name = "index.html" if path == "/" else path.removeprefix("/ui/") if path.startswith("/ui/") else None
    if name is None or not NAME.fullmatch(name) or Path(name).suffix not in TYPES:
        return None
    file = STATIC / name
    if not file.is_file():
        return None
    return TYPES[file.suffix], file.read_bytes()
