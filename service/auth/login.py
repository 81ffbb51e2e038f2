"""``GET/POST /login`` and ``POST /logout``: a browser's session (``core.sessions``).

A page asked for without a session sends a browser here (303 to ``/login?next=…``); a valid
key posted in the form answers 303 back to ``next`` with the session cookie (``HttpOnly``,
``SameSite=Lax``, ``Secure`` over HTTPS); a wrong one answers a 401 page and sets nothing.
A form posted from another site (its ``Origin`` is not this one) is refused with 403.
"""

from __future__ import annotations

import html
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from core import sessions
from core.errors import DomainError, Unauthorized
from core.sessions import COOKIE, LoginRequired, safe_next
from service.http.deps import SessionDep, SettingsDep
from service.http.svg import page

router = APIRouter(include_in_schema=False)


def _form(next_url: str, message: str = "") -> str:
    e = html.escape
    note = f"<p class='flag' role='alert'>{e(message)}</p>" if message else ""
    return f"""
<nav><a href='/'>robustscope</a><a href='/leaderboard/page'>leaderboard</a></nav>
<h1>Log in</h1>{note}
<p class='note'>Paste an API key (<code>robustscope apikey create OWNER</code> makes one, and
<code>robustscope up</code> prints the first). The browser keeps a session cookie that opens
your pages and reports for a while; it cannot submit or change anything: writes need the key
itself.</p>
<form method='post' action='/login' class='login'>
<input type='hidden' name='next' value='{e(next_url)}'>
<label>API key <input type='password' name='api_key' autocomplete='current-password'
required size='48' autofocus></label>
<button type='submit'>Log in</button></form>
<p class='note'>Public evaluations and sweeps open without logging in, and so does
<a href='/leaderboard/page'>the leaderboard</a> (their public rows).</p>"""


def cross_site(request: Request) -> bool:
    """Whether a form was posted from another site: its ``Origin`` (or, without one, its
    ``Referer``) names another host than this request's."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return source == "null"
    return urlsplit(source).netloc != request.headers.get("host", request.url.netloc)


def refuse_cross_site(request: Request) -> None:
    if cross_site(request):
        raise Forbidden("this form must be posted from this site's own pages")


class Forbidden(DomainError):
    status, type, title = 403, "forbidden", "Forbidden"


@router.get("/login", response_class=HTMLResponse)
def login_form(next: str = "/") -> HTMLResponse:  # noqa: A002 - the query parameter's name
    return HTMLResponse(page("robustscope: log in", _form(safe_next(next))))


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, session: SessionDep, settings: SettingsDep,
          api_key: Annotated[str, Form(max_length=500)] = "",
          next: Annotated[str, Form(max_length=2000)] = "/") -> Response:  # noqa: A002
    refuse_cross_site(request)
    target = safe_next(next)
    try:
        token, _, _ = sessions.start(session, api_key.strip(), settings.session_hours)
    except Unauthorized:
        return HTMLResponse(page("robustscope: log in", _form(
            target, "That API key is not valid (or it was revoked).")), status_code=401)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, token, max_age=int(settings.session_hours * 3600), path="/",
                        httponly=True, samesite="lax",
                        secure=request.url.scheme == "https" or settings.session_cookie_secure)
    return response


@router.post("/logout")
def logout(request: Request, session: SessionDep) -> Response:
    refuse_cross_site(request)
    token = request.cookies.get(COOKIE)
    if token:
        sessions.end(session, token)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


def install(app: FastAPI) -> None:
    """A browser asking for a page without a session is sent to the login form."""

    @app.exception_handler(LoginRequired)
    async def _login(_: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={quote(exc.next_url, safe='')}", status_code=303)
