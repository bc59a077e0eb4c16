"""Which files of an output version a W&B run also shows as media, so that the UI displays them.

The engine knows file types, not what the files mean: images (``.png``, ``.jpg``, ``.jpeg``,
``.gif``) become ``wandb.Image``; HTML pages and SVG drawings become ``wandb.Html``. A page's
relative ``<img src="...">`` links to images of the same version are inlined as ``data:`` URIs, so
the page renders in W&B as it does from the store. Keys are ``<output name>/<file path without
suffix>`` (``figures/heads_overlap``, ``figures/report``). Large files and versions with many files
are limited (``MAX_FILES``, ``MAX_BYTES``): the artifact keeps every file either way.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif"}
PAGE_SUFFIXES = {".html", ".htm", ".svg"}
INLINE_TYPES = {**IMAGE_TYPES, ".svg": "image/svg+xml"}
MAX_FILES = 64  # per output version
MAX_BYTES = 20 * 2**20  # per file, and per page after inlining its images
KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")
IMG_SRC = re.compile(r"""(<img\b[^>]*?\bsrc\s*=\s*)(["'])(.*?)\2""", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Media:
    """One file to log: under ``key``, as an image or a page."""

    key: str
    path: Path
    kind: Literal["image", "html"]


def media_key(output: str, rel: str) -> str:
    """``<output>/<rel without its suffix>``, in characters W&B keys keep as they are."""
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    return KEY_UNSAFE.sub("_", f"{output}/{stem}")


def select_media(output: str, root: Path, files: Iterable[tuple[str, int]]) -> tuple[list[Media], list[str]]:
    """The version's files (relative path, size) under ``root`` that W&B shows as media, and a note
    for each one left out."""
    chosen: list[Media] = []
    notes: list[str] = []
    keys: set[str] = set()
    for rel, size in sorted(files):
        suffix = Path(rel).suffix.lower()
        kind: Literal["image", "html"] | None = "image" if suffix in IMAGE_TYPES else "html" if suffix in PAGE_SUFFIXES else None
        if kind is None:
            continue
        if size > MAX_BYTES:
            notes.append(f"{rel}: {size} bytes, over {MAX_BYTES}: not shown as media (it is in the artifact)")
            continue
        if len(chosen) == MAX_FILES:
            notes.append(f"{rel} and later files: more than {MAX_FILES} media files: not shown as media")
            break
        key = media_key(output, rel)
        if key in keys:  # x.png next to x.jpg
            key = media_key(output, rel.replace(".", "_"))
        keys.add(key)
        chosen.append(Media(key, root / rel, kind))
    return chosen, notes


def _data_uri(path: Path) -> str:
    mime = INLINE_TYPES[path.suffix.lower()]
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def inline_images(page: str, page_path: Path, root: Path) -> str:
    """``page`` with each relative ``<img src>`` that names an image file inside ``root`` replaced
    by a ``data:`` URI; unchanged where the result would exceed ``MAX_BYTES``."""
    base = root.resolve()

    def replace(m: re.Match[str]) -> str:
        src = html.unescape(m.group(3)).strip()
        if not src or src.startswith(("/", "#")) or ":" in src.split("/", 1)[0]:  # absolute, a scheme, data:
            return m.group(0)
        target = (page_path.parent / src.split("?", 1)[0].split("#", 1)[0]).resolve()
        if target.suffix.lower() not in INLINE_TYPES or not target.is_relative_to(base) or not target.is_file():
            return m.group(0)
        if target.stat().st_size > MAX_BYTES:
            return m.group(0)
        return f"{m.group(1)}{m.group(2)}{_data_uri(target)}{m.group(2)}"

    inlined = IMG_SRC.sub(replace, page)
    return inlined if len(inlined) <= MAX_BYTES else page


def page_html(item: Media, root: Path) -> str:
    """The HTML to show for a page (its images inlined) or an SVG drawing."""
    text = item.path.read_text(encoding="utf-8", errors="replace")
    if item.path.suffix.lower() == ".svg":
        return f"<html><body>{text}</body></html>"
    return inline_images(text, item.path, root)


def wandb_media(wandb: ModuleType, items: Iterable[Media], root: Path) -> dict[str, Any]:
    """``{key: wandb.Image | wandb.Html}`` for ``run.log``."""
    out: dict[str, Any] = {}
    for item in items:
        if item.kind == "image":
            out[item.key] = wandb.Image(str(item.path))
        else:
            out[item.key] = wandb.Html(page_html(item, root), inject=False, data_is_not_path=True)
    return out
