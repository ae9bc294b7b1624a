"""The web front end: the chat page (GET /), the ops page (GET /admin), the feedback widget (GET /widget.js) and
their assets (GET /static/<file>), plain files from service/static/ with no build step.

The pages hold no secrets: each asks for its key in the browser and calls the JSON APIs with it.
Open http://127.0.0.1:8000/ after `alignd serve` (add `?compare=0.3` to get a side-by-side pair on 30 % of turns).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.errors import APIError

router = APIRouter(tags=["pages"], include_in_schema=False)

STATIC = Path(__file__).resolve().parent.parent / "static"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# The pages load only their own scripts; the widget injects one <style> element, hence 'unsafe-inline' for styles.
_PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def _file(name: str, page: bool = False) -> FileResponse:
    path = STATIC / name
    # Only plain files directly in static/ are served: no sub-paths, no dot-files, nothing outside the folder.
    if "/" in name or "\\" in name or name.startswith(".") or path.suffix not in _TYPES or not path.is_file():
        raise APIError(404, f"no static file {name!r}", "not_found")
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}  # revalidate: ETag makes it cheap
    if page:
        headers["Content-Security-Policy"] = _PAGE_CSP
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=headers)


@router.get("/")
async def chat_page() -> FileResponse:
    """The chat page: streamed answers, the policy version of each, feedback through the widget."""
    return _file("chat.html", page=True)


@router.get("/admin")
async def ops_page() -> FileResponse:
    """The ops page: versions, metrics, feedback counts, win rates and rollback (asks for the admin key)."""
    return _file("admin.html", page=True)


@router.get("/widget.js")
async def widget() -> FileResponse:
    """The embeddable feedback widget (`AligndFeedback.attach`)."""
    return _file("widget.js")


@router.get("/static/{name}")
async def static_file(name: str) -> FileResponse:
    return _file(name)
