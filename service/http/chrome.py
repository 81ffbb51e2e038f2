"""What every page carries around its content: the navigation (with who is logged in, and a
log-out button, or a log-in link that comes back here), wide tables that scroll, the share
form, and how threats and suite entries are written for a person."""

from __future__ import annotations

import html
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.tables import Dataset

NORM_NAMES = {"linf": "l_inf", "l2": "l_2", "l1": "l_1"}


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


def entry_label(suite: list[dict[str, Any]], index: Any) -> str:
    """A suite entry as a person reads it: ``entry 2: adversarial (autoattack, l_inf, eps
    8/255)``."""
    if not isinstance(index, int) or not 0 <= index < len(suite):
        return "the whole evaluation"
    entry = suite[index]
    bench = str(entry.get("benchmark", "?"))
    parts = []
    if entry.get("attack"):
        parts.append(str(entry["attack"]))
    norm = entry.get("norm")
    if norm:
        parts.append(NORM_NAMES.get(str(norm), str(norm)))
    eps = entry.get("eps")
    if eps is not None:
        values = eps if isinstance(eps, list) else [eps]
        parts.append("eps " + ", ".join(eps_text(str(norm), float(v)) for v in values))
    return f"entry {index + 1}: {bench}" + (f" ({', '.join(parts)})" if parts else "")


def eps_text(norm: str, eps: float) -> str:
    """An eps as people write it: l_inf in 255ths when it is one (8/255), else its value."""
    if norm == "linf" and abs(eps * 255 - round(eps * 255)) < 1e-3 and eps > 0:
        return f"{round(eps * 255)}/255"
    return f"{eps:.4g}"


def dataset_names(session: Session, refs: Iterable[str]) -> dict[str, str]:
    """How to show each dataset reference: a built-in by its name, an upload (recorded by its
    id) by the name it was uploaded under; an id whose upload is gone stays an id."""
    ids = {}
    for ref in refs:
        try:
            ids[uuid.UUID(ref)] = ref
        except ValueError:
            continue
    names = {ref: ref for ref in refs}
    if ids:
        for row_id, name in session.execute(select(Dataset.id, Dataset.name)
                                            .where(Dataset.id.in_(list(ids)))):
            names[ids[row_id]] = name
    return names


def num(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, never "-0.000" (a value that rounds to zero)."""
    return f"{round(value, digits) + 0.0:.{digits}f}"
