"""Language-level controls (docs/methods.md section 11): token overlap and syntactic distance.

Stage ``token_overlap`` (inputs ``tokenizer``, ``parallel``): for every parallel sentence, the share
of language l's distinct subword ids that also occur in the reference language's version of the
sentence, ``|set(ids_ref) & set(ids_l)| / |set(ids_l)|``, averaged over sentences. Ids are those of
``tokenizer(text, add_special_tokens=False)`` minus every special id of the tokenizer
(``all_special_ids``: <s>, </s>, <pad>, <mask> and <unk>: an <unk> in both texts is not shared
vocabulary). A sentence whose l-side has no id left is skipped (counted in the metadata). The
reference language scores 1.0.

Output ``metrics``: ``token_overlap.json``::

    {"reference": "en", "languages": [...], "overlap": {"en": 1.0, "es": 0.31, ...}, "n": 1000}

Stage ``language_distance`` (no inputs): the syntactic distance of every pair of languages from
URIEL's typological data as shipped in the PyPI package ``urielplus`` (no download at run time):
``URIELPlus().new_distance("syntactic", [iso3 codes])``, i.e. for each pair the angular distance
(``2 arccos(cos) / pi``; or cosine distance, ``metric``) between the two languages' vectors of
URIEL ``S_*`` syntax features, restricted to the features both languages have values for, with
URIEL+'s default union aggregation of its sources (a feature is 1 when any source says 1).
ISO 639-1 codes are mapped to URIEL's ISO 639-3 codes (:data:`ISO3`; individual languages rather
than macrolanguages: zh -> cmn Mandarin, ar -> arb Standard Arabic; override with ``iso3``).
A pair without shared features is ``null``.

urielplus copies its data files from ``database/original_uriel`` into ``database/`` inside its own
package folder on first use, so that folder must be writable once (a clear error says so).
lang2vec 1.1.2 was not used: it has no distance function and imports ``pkg_resources``, which
setuptools >= 82 no longer provides.

Output ``metrics``: ``language_distance.json``::

    {"method": "...", "languages": [...], "syntactic": [[n x n]], "reference": "en"}
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Iterator, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from orchestrator.stage import Input, Inputs, StageContext, StageDef, StageParams, stage
from stages._io import get_input, write_json
from stages.corpus import DEFAULT_LANGUAGES
from stages.formats.metrics import LANGUAGE_DISTANCE_JSON, TOKEN_OVERLAP_JSON
from stages.formats.parallel import read_parallel

# ISO 639-1 -> the ISO 639-3 code URIEL uses for the language (individual languages, not macrolanguages)
ISO3: dict[str, str] = {
    "ar": "arb", "bn": "ben", "de": "deu", "el": "ell", "en": "eng", "es": "spa", "et": "est", "eu": "eus",
    "fa": "pes", "fi": "fin", "fr": "fra", "he": "heb", "hi": "hin", "hu": "hun", "id": "ind", "it": "ita",
    "ja": "jpn", "ko": "kor", "nl": "nld", "pl": "pol", "pt": "por", "ro": "ron", "ru": "rus", "sv": "swe",
    "sw": "swh", "ta": "tam", "te": "tel", "th": "tha", "tl": "tgl", "tr": "tur", "uk": "ukr", "ur": "urd",
    "vi": "vie", "zh": "cmn",
}


# --------------------------------------------------------------------------------------------------
# Token overlap
# --------------------------------------------------------------------------------------------------


class TokenOverlapParams(StageParams):
    """Parameters of the ``token_overlap`` stage."""

    reference: str = Field("en", description="Language whose subwords the others are compared with.")


def sentence_overlap(ref_ids: set[int], ids: set[int]) -> float | None:
    """``|ref & ids| / |ids|``; None when ``ids`` is empty."""
    return len(ref_ids & ids) / len(ids) if ids else None


def token_overlap(
    tokenizer: Any, ref_texts: Sequence[str], texts: Sequence[str]
) -> tuple[float, int]:
    """Mean per-sentence overlap of ``texts`` with the aligned ``ref_texts``, and sentences used."""
    special = {int(i) for i in tokenizer.all_special_ids}

    def id_sets(batch: Sequence[str]) -> list[set[int]]:
        enc = tokenizer(list(batch), add_special_tokens=False, verbose=False)["input_ids"]
        return [set(row) - special for row in enc]

    scores = [
        s for s in (sentence_overlap(r, t) for r, t in zip(id_sets(ref_texts), id_sets(texts), strict=True))
        if s is not None
    ]
    return (sum(scores) / len(scores) if scores else math.nan), len(scores)


@stage(
    "token_overlap",
    params=TokenOverlapParams,
    inputs={"tokenizer": Input(type="tokenizer"), "parallel": Input(type="parallel-corpus")},
    outputs={"metrics": "metrics"},
    version="1",
)
def token_overlap_stage(params: TokenOverlapParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Share of each language's subwords that also occur in the reference sentence, averaged."""
    from stages.mlm import load_tokenizer

    tok_in, par_in = get_input(inputs, "tokenizer"), get_input(inputs, "parallel")
    languages, rows = read_parallel(par_in.path)
    if params.reference not in languages:
        raise ValueError(f"reference {params.reference!r} is not in the parallel corpus ({languages})")
    tokenizer = load_tokenizer(tok_in.path)
    ref_texts = [r[params.reference] for r in rows]
    overlap: dict[str, float | None] = {}
    used: dict[str, int] = {}
    for lang in languages:
        value, used[lang] = token_overlap(tokenizer, ref_texts, [r[lang] for r in rows])
        overlap[lang] = value if math.isfinite(value) else None
    result = {"reference": params.reference, "languages": languages, "overlap": overlap, "n": len(rows)}
    write_json(ctx.output_dir("metrics") / TOKEN_OVERLAP_JSON, result)
    ctx.log({f"overlap/{k}": v for k, v in overlap.items() if v is not None})
    return {"metrics": {**result, "sentences_used": used}}


TOKEN_OVERLAP: StageDef = token_overlap_stage


# --------------------------------------------------------------------------------------------------
# Syntactic distance (URIEL via urielplus)
# --------------------------------------------------------------------------------------------------


class LanguageDistanceParams(StageParams):
    """Parameters of the ``language_distance`` stage."""

    languages: list[str] = Field(default_factory=lambda: list(DEFAULT_LANGUAGES), min_length=2,
                                 description="Language codes (ISO 639-1, or ISO 639-3 as URIEL spells them).")
    reference: str = Field("en", description="Reference language of the study (recorded for the plots).")
    method: Literal["urielplus"] = Field("urielplus", description="Source of the distances (URIEL via urielplus).")
    metric: Literal["angular", "cosine"] = Field("angular", description="Distance between feature vectors.")
    iso3: dict[str, str] = Field(default_factory=dict, description="Code -> URIEL ISO 639-3 overrides, e.g. "
                                 "{'zh': 'zho', 'ar': 'ara'} for the macrolanguages.")

    @field_validator("languages")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"languages: duplicates in {v}")
        return v


def uriel_code(lang: str, overrides: dict[str, str] | None = None) -> str:
    """URIEL's ISO 639-3 code of ``lang`` (an override, the built-in map, or a 3-letter code as is)."""
    if overrides and lang in overrides:
        return overrides[lang]
    if lang in ISO3:
        return ISO3[lang]
    if len(lang) == 3 and lang.isalpha() and lang.islower():
        return lang
    raise ValueError(f"no ISO 639-3 code known for {lang!r}; add it to iso3 (e.g. iso3: {{{lang}: xxx}})")


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """urielplus calls ``logging.basicConfig(INFO)`` on import and logs timings at INFO on the root
    logger: undo the handlers it adds and silence INFO while it runs."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)


def _urielplus_folder() -> Path:
    spec = find_spec("urielplus")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("language_distance needs the PyPI package 'urielplus' (pip install urielplus)")
    return Path(next(iter(spec.submodule_search_locations)))


def load_urielplus() -> Any:
    """A ``URIELPlus`` instance (its data first copied into its package folder, which must be writable)."""
    folder = _urielplus_folder() / "database"
    files = ("family_features.npz", "features.npz", "geocoord_features.npz", "script_features.npz")
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and not os.access(folder, os.W_OK):
        raise ValueError(
            f"urielplus copies its data into {folder} on first use, but that folder is not writable; run once "
            "with write access (e.g. python -c 'from urielplus import urielplus; urielplus.URIELPlus()')"
        )
    with _quiet_root_logger():
        from urielplus import urielplus

        return urielplus.URIELPlus()


def syntactic_distances(codes: Sequence[str], metric: str = "angular") -> list[list[float | None]]:
    """Symmetric matrix of URIEL syntactic distances between ISO 639-3 ``codes`` (None: no shared data).

    One ``new_distance("syntactic", [a, b])`` call per pair: each pair uses the features both of its
    languages have (what urielplus' matrix form computes too).
    """
    uriel = load_urielplus()
    uriel.set_distance_metric(metric)
    known = set(uriel.langs[0].tolist()) & set(uriel.langs[1].tolist())
    unknown = [c for c in codes if c not in known]
    if unknown:
        raise ValueError(f"URIEL has no language(s) {unknown}; map them with iso3")
    n = len(codes)
    out: list[list[float | None]] = [[0.0 if i == j else None for j in range(n)] for i in range(n)]
    with _quiet_root_logger():
        for i in range(n):
            for j in range(i + 1, n):
                try:
                    value: float | None = float(uriel.new_distance("syntactic", [codes[i], codes[j]]))
                except ValueError as e:
                    if "No shared" not in str(e):
                        raise
                    value = None
                out[i][j] = out[j][i] = value
    return out


def _urielplus_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("urielplus")
    except PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=1)
def uriel_languages() -> frozenset[str] | None:
    """The ISO 639-3 codes that :func:`syntactic_distances` accepts (those with both family and
    typological data in the URIEL+ files it loads), read without loading URIEL+; None without urielplus."""
    import numpy as np

    try:
        folder = _urielplus_folder() / "database"
    except ValueError:
        return None
    sets = []
    for name in ("family_features.npz", "features.npz"):
        path = folder / name if (folder / name).is_file() else folder / "original_uriel" / name
        try:
            with np.load(path, allow_pickle=False) as data:
                sets.append({str(code) for code in data["langs"].tolist()})
        except (OSError, KeyError, ValueError):  # damaged or missing: the stage says so when it runs
            return None
    return frozenset(sets[0] & sets[1])


def check_language_distance(params: LanguageDistanceParams) -> list[str]:
    """What a language_distance job would fail on, known without running (``check`` hook): a reference
    outside the languages, a language without an ISO 639-3 code or without URIEL data."""
    problems = []
    if params.reference not in params.languages:
        problems.append(f"reference: {params.reference!r} is not one of the languages {params.languages}")
    codes = {lang: _code_or_none(lang, params.iso3) for lang in params.languages}
    known = uriel_languages()
    unmapped = [lang for lang, code in codes.items() if code is None]
    unknown = [lang for lang, code in codes.items() if code is not None and known is not None and code not in known]
    found = [f"no ISO 639-3 code known for {', '.join(map(repr, unmapped))}"] if unmapped else []
    if unknown:
        found.append("URIEL has no data for " + ", ".join(f"{lang!r} (ISO 639-3 {codes[lang]!r})" for lang in unknown))
    if found:
        problems.append(
            f"languages: {'; '.join(found)}; remove them, or map each to a code URIEL has with iso3 "
            f"(e.g. iso3: {{{(unmapped + unknown)[0]}: <code>}})"
        )
    return problems


def _code_or_none(lang: str, overrides: dict[str, str]) -> str | None:
    try:
        return uriel_code(lang, overrides)
    except ValueError:
        return None


def prefetch_language_distance(params: LanguageDistanceParams) -> Iterator[str]:
    """urielplus copies its data into its package folder on first use: do that now, where the
    environment is writable (``prefetch`` hook; nothing is downloaded)."""
    load_urielplus()
    yield f"URIEL+ data (urielplus {_urielplus_version()}, {_urielplus_folder() / 'database'})"


@stage(
    "language_distance",
    params=LanguageDistanceParams,
    outputs={"metrics": "metrics"},
    version="1",
    prefetch=prefetch_language_distance,
    check=check_language_distance,
)
def language_distance_stage(
    params: LanguageDistanceParams, inputs: Inputs, ctx: StageContext
) -> dict[str, dict[str, Any]]:
    """Syntactic distance between every pair of languages from URIEL (urielplus shipped data)."""
    if params.reference not in params.languages:
        raise ValueError(f"reference {params.reference!r} is not in languages {params.languages}")
    codes = [uriel_code(lang, params.iso3) for lang in params.languages]
    matrix = syntactic_distances(codes, params.metric)
    mapping = ", ".join(f"{lang}={code}" for lang, code in zip(params.languages, codes, strict=True))
    method = (
        f"urielplus {_urielplus_version()} new_distance('syntactic'): {params.metric} distance between URIEL "
        f"S_* syntax feature vectors over the features both languages have (union aggregation); ISO 639-3 {mapping}"
    )
    result = {"method": method, "languages": list(params.languages), "syntactic": matrix,
              "reference": params.reference}
    write_json(ctx.output_dir("metrics") / LANGUAGE_DISTANCE_JSON, result)
    ref = params.languages.index(params.reference)
    ctx.log({f"syntactic/{params.reference}-{lang}": v for lang, v in zip(params.languages, matrix[ref], strict=True)
             if v is not None and lang != params.reference})
    return {"metrics": {**result, "iso3": dict(zip(params.languages, codes, strict=True))}}


LANGUAGE_DISTANCE: StageDef = language_distance_stage
