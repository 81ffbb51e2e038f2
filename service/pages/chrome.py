"""What every page carries around its content: the navigation (with who is logged in, and a
log-out button, or a log-in link that comes back here), and wide tables that scroll."""

from __future__ import annotations

import html
from urllib.parse import quote


def nav(viewer: str | None, here: str, *links: tuple[str, str]) -> str:
    """``links`` as (href, text), each link's class its text's first word; ``here`` is this
    page's path, to come back to after login. A viewer of ``None`` is anonymous (or reads
    through a share link: ``here`` empty)."""
    e = html.escape
    items = [("/", "robustscope"), ("/leaderboard/page", "leaderboard"), *links]
    out = "".join(f"<a class='{e(text.split()[0])}' href='{e(href)}'>{e(text)}</a>"
                  for href, text in items)
    if viewer is not None:
        out += (f"<span class='who'>logged in as <b>{e(viewer)}</b></span>"
                "<form method='post' action='/logout'><button type='submit'>log out</button>"
                "</form>")
    elif here:
        out += (f"<a class='who login' href='/login?next={e(quote(here, safe=''))}'>log in</a>")
    return f"<nav>{out}</nav>"


def scroll(table_html: str) -> str:
    """A table wider than the page scrolls sideways, its first column kept in view."""
    return f"<div class='scroll'>{table_html}</div>"


def share_form(kind: str, target_id: object) -> str:
    """The owner's form to make a read-only link to a private report (``kind`` evaluation or
    sweep). Making a link is a change, so it asks for the API key: the login cookie alone
    authorises no write."""
    return f"""
<h2>Share this {kind}</h2>
<p class='note'>A link opens this page read-only to anyone holding it, until it expires or
you revoke it. Making one asks for your API key (the login cookie alone cannot make
changes).</p>
<form method='post' action='/share-links/form' class='share'>
<input type='hidden' name='kind' value='{html.escape(kind)}'>
<input type='hidden' name='target_id' value='{html.escape(str(target_id))}'>
<label>API key <input type='password' name='api_key' required size='40'></label>
<label>valid for <input type='number' name='days' value='7' min='1' max='90' size='3'>
days</label>
<button type='submit'>Make a share link</button></form>"""
