"""Stages ``cross_eval`` and ``mask_stats``: how language-specific are the pruned subnetworks?

``cross_eval``: for every subnetwork language ``s`` (one ``head-mask`` per language) and every eval
language ``t``, the deterministic-mask perplexity (:mod:`stages.mlm`) of the model gated with mask
``s`` (:class:`stages.gating.HeadGates`) on the **reporting half** of ``t``'s test documents
(``split="report"``: the masks were chosen on the selection half, ``stages.dataset``), plus the
ungated full model as the last row ``"full"``. **Rows are subnetworks, columns are eval languages**
(the original swapped the labels of its heatmap); the JSON names both axes. Every cell carries a
percentile-bootstrap interval over the eval chunks (:func:`stages.mlm.bootstrap_perplexity_interval`,
resamples seeded by ``(eval_seed, column language)``, so paired across rows).

**Size-matched random masks.** A subnetwork that keeps fewer heads is worse on every language, so
most of an off-diagonal gap can be size, not language. For each language's mask and each of
``random_mask_seeds`` seeds, :func:`size_matched_random_mask` draws a mask keeping exactly the same
number of heads in every layer, uniformly at random; each is evaluated on every column.
``relative_to_random`` = perplexity of the language's own mask / mean perplexity of its random
masks, on the same column: below 1, the chosen heads beat random heads of the same budget. Seeds:
``seeds = SeedSequence([stage seed, 0x72616E64]).generate_state(random_mask_seeds)`` (the stage
seed is the ``seed`` parameter, else the job's seed); random mask ``r`` of language ``s`` uses
``numpy.random.default_rng([seeds[r], crc32(s)])``. Identical masks are evaluated once (memoised).

Output ``metrics`` (type ``metrics``)::

    cross_eval.json  {"row_axis": "subnetwork", "col_axis": "eval_language", "rows": [..., "full"],
                      "cols": [...], "perplexity": [[...]], "loss": [[...]],
                      "perplexity_interval": [[[lo, hi] per col] per row],
                      "relative_perplexity": [[ppl / ppl of the full model on that column]],
                      "tokens": {lang: masked tokens}, "heads_kept": {row: n}, "eval_seed",
                      "eval_split": "report", "interval": {"method", "level", "resamples"},
                      "random": {"seeds", "rows" (mask languages), "cols",
                                 "perplexity_by_seed": [[[per col] per seed] per row],
                                 "perplexity_mean", "perplexity_std" (ddof 1; null for one seed),
                                 "perplexity_min", "perplexity_max": [[per col] per row],
                                 "relative_to_random": [[own ppl / mean random ppl]],
                                 "heads_kept_per_layer": {lang: [per layer]}, "method"}
                      (no "random" key when random_mask_seeds is 0), ...}
    cross_eval.csv   header "subnetwork,<lang>,...", one row per subnetwork (perplexity)

``mask_stats`` (numpy only): per layer, the proportion of heads masked (mean over languages of
masked/heads **in that layer**; the original summed the wrong axis), heads kept per language, the
share of parameters removed, and the Jaccard index of the **kept** heads for every pair of
languages, with its chance level: the distribution of the Jaccard index of two independent random
masks with the same per-layer head counts as the pair (:func:`jaccard_chance`, exact: the overlap
in a layer is hypergeometric, the total overlap their convolution), as its mean and 5-95%
quantiles. Output ``metrics``: ``mask_stats.json``.

Parameters counted as removed with a masked head (XLM-R/BERT self-attention, per layer, head_dim
d = hidden/heads): the head's d rows of the query, key and value weights and their d bias entries
each, and its d input columns of the attention output projection: ``4*hidden*d + 3*d`` per head.
Not counted: the output projection's bias and the LayerNorm (shared by all heads). Proportions are
given relative to all self-attention parameters (``L * (4*hidden^2 + 4*hidden)``) and, when the
model's parameter count is known (mask.json ``num_parameters`` or the ``total_params`` parameter),
relative to the whole model.
"""

from __future__ import annotations

import csv
import io
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from orchestrator.stage import Input, Inputs, ResolvedInput, StageContext, StageDef, StageParams, stage
from stages._io import effective_seed, get_input, write_json
from stages.mlm import EvalParams
from stages.prune import read_mask_dir

FULL = "full"
RANDOM_MASK_WORD = 0x72616E64  # "rand": keeps the random-mask seeds apart from other uses of the stage seed
CHANCE_QUANTILES = (0.05, 0.95)

# --------------------------------------------------------------------------------------------------
# Reading head masks
# --------------------------------------------------------------------------------------------------


def mask_inputs(inputs: Inputs, name: str = "masks") -> list[tuple[str, np.ndarray, dict[str, Any]]]:
    """``(language, mask, mask.json)`` of every ``head-mask`` input, in input order.

    The language comes from the producing job's matrix point, else mask.json, else the artifact
    metadata. Two masks of the same language are an error.
    """
    value = inputs.get(name)
    if value is None:
        raise ValueError(f"input {name!r} is missing: connect the head-mask artifacts (one per language)")
    items: list[ResolvedInput] = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError(f"input {name!r} is empty: no head-mask artifact")
    out: list[tuple[str, np.ndarray, dict[str, Any]]] = []
    for inp in items:
        mask, info = read_mask_dir(inp.path)
        lang = inp.point.get("language") or info.get("language") or inp.metadata.get("language")
        if not lang:
            raise ValueError(f"head mask {inp.ref} does not say its language (matrix point, mask.json, metadata)")
        if any(lang == seen for seen, _, _ in out):
            raise ValueError(f"two head masks for language {lang!r} (the second is {inp.ref})")
        if lang == FULL:
            raise ValueError(f"a head mask may not be named {FULL!r}: the name of the unpruned model's row")
        out.append((str(lang), mask, info))
    shapes = {m.shape for _, m, _ in out}
    if len(shapes) != 1:
        raise ValueError(f"head masks have different shapes: {sorted(shapes)}")
    return out


# --------------------------------------------------------------------------------------------------
# mask_stats: pure numpy
# --------------------------------------------------------------------------------------------------


def stack_masks(masks: Sequence[np.ndarray]) -> np.ndarray:
    """``[n_languages, L, H]`` boolean array of kept heads (mask values > 0.5)."""
    arr = np.stack([np.asarray(m, dtype=np.float64) for m in masks])
    if arr.ndim != 3:
        raise ValueError(f"expected [layers, heads] masks, got stacked shape {arr.shape}")
    if not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError("head masks must be 0/1")
    return arr > 0.5


def masked_per_layer(masks: Sequence[np.ndarray]) -> np.ndarray:
    """[L]: mean over languages of (masked heads in the layer / heads per layer)."""
    kept = stack_masks(masks)
    return (~kept).mean(axis=2).mean(axis=0)


def masked_per_layer_by_language(masks: Sequence[np.ndarray]) -> np.ndarray:
    """[n_languages, L]: masked heads in each layer / heads per layer."""
    return (~stack_masks(masks)).mean(axis=2)


def heads_kept(masks: Sequence[np.ndarray]) -> np.ndarray:
    """[n_languages]: number of kept heads."""
    return stack_masks(masks).sum(axis=(1, 2))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of the kept heads of two masks (1.0 when both keep nothing)."""
    ka, kb = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    union = int((ka | kb).sum())
    return 1.0 if union == 0 else int((ka & kb).sum()) / union


def jaccard_matrix(masks: Sequence[np.ndarray]) -> np.ndarray:
    """[n, n] Jaccard index of kept heads for every pair of masks (symmetric, diagonal 1)."""
    n = len(masks)
    out = np.ones((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = jaccard(masks[i], masks[j])
    return out


def _kept_per_layer(mask: np.ndarray) -> np.ndarray:
    """[L] number of kept heads (values > 0.5) per layer of a [L, H] mask."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"a head mask must be [layers, heads], got shape {arr.shape}")
    return (arr > 0.5).sum(axis=1)


def overlap_distribution(n_heads: int, kept_a: Sequence[int], kept_b: Sequence[int]) -> np.ndarray:
    """P(|A ∩ B| = x), x = 0, 1, ..., for independent uniformly random masks A and B that keep
    ``kept_a[l]`` and ``kept_b[l]`` of the ``n_heads`` heads of layer ``l``.

    In one layer the overlap is hypergeometric, ``C(ka, x) C(H - ka, kb - x) / C(H, kb)``; layers are
    independent, so the total is the convolution of the per-layer distributions.
    """
    pmf = np.ones(1)
    for ka, kb in zip(kept_a, kept_b, strict=True):
        ka, kb = int(ka), int(kb)
        layer = np.array([math.comb(ka, x) * math.comb(n_heads - ka, kb - x) for x in range(min(ka, kb) + 1)], dtype=np.float64)
        pmf = np.convolve(pmf, layer / math.comb(n_heads, kb))
    return pmf


def jaccard_chance(a: np.ndarray, b: np.ndarray, quantiles: tuple[float, float] = CHANCE_QUANTILES) -> tuple[float, float, float]:
    """The Jaccard index of kept heads expected by chance for the pair ``(a, b)``: ``(mean, lo, hi)``
    over two independent random masks with the same per-layer head counts as ``a`` and ``b``.

    Exact, not simulated: with ``Ka``, ``Kb`` heads kept in all and ``X`` the overlap
    (:func:`overlap_distribution`), the index is ``X / (Ka + Kb - X)`` (1 when both keep nothing),
    increasing in ``X``, so its quantiles are those of ``X`` mapped through it; ``lo``/``hi`` are the
    ``quantiles`` (default 5% and 95%; the smallest value whose cumulative probability reaches them).
    """
    ka, kb = _kept_per_layer(a), _kept_per_layer(b)
    if np.shape(a) != np.shape(b):
        raise ValueError(f"masks of different shapes {np.shape(a)} and {np.shape(b)}")
    pmf = overlap_distribution(int(np.shape(a)[1]), ka.tolist(), kb.tolist())
    x = np.arange(pmf.size, dtype=np.float64)
    union = float(ka.sum() + kb.sum()) - x
    index = np.divide(x, union, out=np.ones_like(x), where=union > 0)
    cdf = np.cumsum(pmf)
    lo, hi = (index[min(int(np.searchsorted(cdf, q - 1e-12)), pmf.size - 1)] for q in quantiles)
    return float(pmf @ index), float(lo), float(hi)


def jaccard_chance_matrix(
    masks: Sequence[np.ndarray], quantiles: tuple[float, float] = CHANCE_QUANTILES
) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [n, n], interval [n, n, 2])`` of :func:`jaccard_chance` for every pair of masks
    (the diagonal: two random masks with the same counts as that one mask)."""
    n = len(masks)
    means = np.zeros((n, n))
    intervals = np.zeros((n, n, 2))
    for i in range(n):
        for j in range(i, n):
            mean, lo, hi = jaccard_chance(masks[i], masks[j], quantiles)
            means[i, j] = means[j, i] = mean
            intervals[i, j] = intervals[j, i] = (lo, hi)
    return means, intervals


def attention_params_per_head(hidden_size: int, num_heads: int) -> int:
    """Parameters removed with one head: Q, K, V rows (+ biases) and output-projection columns."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden size {hidden_size} is not a multiple of {num_heads} heads")
    d = hidden_size // num_heads
    return 4 * hidden_size * d + 3 * d


def attention_params_per_layer(hidden_size: int) -> int:
    """Self-attention parameters of one layer: Q, K, V, output projection, weights and biases."""
    return 4 * hidden_size * hidden_size + 4 * hidden_size


def params_removed(mask: np.ndarray, hidden_size: int) -> int:
    """Parameters functionally removed by the masked heads of one mask."""
    mask = np.asarray(mask)
    return int((mask <= 0.5).sum()) * attention_params_per_head(hidden_size, mask.shape[1])


def mask_statistics(
    languages: Sequence[str],
    masks: Sequence[np.ndarray],
    hidden_size: int | None = None,
    total_params: int | None = None,
) -> dict[str, Any]:
    """Everything ``mask_stats`` writes, from the masks (and optionally the model's sizes)."""
    kept = stack_masks(masks)
    n_layers, n_heads = kept.shape[1:]
    jac = jaccard_matrix(masks)
    chance_mean, chance_interval = jaccard_chance_matrix(masks)
    by_lang = masked_per_layer_by_language(masks)
    pair_index = [(i, j) for i in range(len(languages)) for j in range(i + 1, len(languages))]
    pair_jaccards = [float(jac[i, j]) for i, j in pair_index]
    pairs = [
        {
            "a": languages[i],
            "b": languages[j],
            "jaccard": float(jac[i, j]),
            "chance_mean": float(chance_mean[i, j]),
            "chance_interval": [float(v) for v in chance_interval[i, j]],
        }
        for i, j in pair_index
    ]
    stats: dict[str, Any] = {
        "languages": list(languages),
        "num_layers": int(n_layers),
        "num_heads": int(n_heads),
        "total_heads": int(n_layers * n_heads),
        "heads_kept": {lang: int(n) for lang, n in zip(languages, kept.sum(axis=(1, 2)), strict=True)},
        "proportion_heads_masked": {
            lang: float(1 - n / (n_layers * n_heads)) for lang, n in zip(languages, kept.sum(axis=(1, 2)), strict=True)
        },
        "masked_per_layer": masked_per_layer(masks).tolist(),
        "masked_per_layer_by_language": {lang: row.tolist() for lang, row in zip(languages, by_lang, strict=True)},
        "heads_kept_by_all": int(kept.all(axis=0).sum()),
        "heads_kept_by_any": int(kept.any(axis=0).sum()),
        "jaccard": {"labels": list(languages), "matrix": jac.tolist()},
        "jaccard_pairs": pairs,
        "jaccard_min": min(pair_jaccards, default=None),
        "jaccard_max": max(pair_jaccards, default=None),
        "jaccard_mean": float(np.mean(pair_jaccards)) if pairs else None,
        "jaccard_chance": {
            "labels": list(languages),
            "mean": chance_mean.tolist(),
            "interval": chance_interval.tolist(),
            "quantiles": list(CHANCE_QUANTILES),
            "method": (
                "exact distribution of the Jaccard index of two independent uniformly random masks with the "
                "pair's per-layer kept-head counts (per-layer hypergeometric overlaps, convolved over layers); "
                "mean and the 5% and 95% quantiles"
            ),
        },
        "jaccard_chance_mean": float(np.mean([chance_mean[i, j] for i, j in pair_index])) if pairs else None,
        "parameter_counting": (
            "per masked head: its head_dim rows of the query, key and value weights and biases and its head_dim "
            "input columns of the attention output projection (4*hidden*head_dim + 3*head_dim); output-projection "
            "bias and LayerNorm not counted"
        ),
        "hidden_size": hidden_size,
        "total_params": total_params,
    }
    if hidden_size is not None:
        removed = {lang: params_removed(m, hidden_size) for lang, m in zip(languages, masks, strict=True)}
        attn_total = n_layers * attention_params_per_layer(hidden_size)
        stats["params_removed"] = removed
        stats["attention_params"] = attn_total
        stats["proportion_attention_params_removed"] = {k: v / attn_total for k, v in removed.items()}
        if total_params:
            stats["proportion_params_removed"] = {k: v / total_params for k, v in removed.items()}
    return stats


# --------------------------------------------------------------------------------------------------
# cross_eval: the matrix, given a perplexity function
# --------------------------------------------------------------------------------------------------


def cross_matrix(
    rows: Sequence[tuple[str, np.ndarray | None]],
    cols: Sequence[str],
    eval_fn: Callable[[np.ndarray | None, str], Mapping[str, float]],
    keys: Sequence[str] = ("loss", "perplexity"),
) -> dict[str, np.ndarray]:
    """One matrix [rows, cols] per key of ``keys`` (default ``loss``, ``perplexity``):
    ``eval_fn(mask or None, eval_language)[key]`` (None = the ungated model) for every row mask and
    column language."""
    out = {key: np.full((len(rows), len(cols)), np.nan) for key in keys}
    for i, (_, mask) in enumerate(rows):
        for j, lang in enumerate(cols):
            res = eval_fn(mask, lang)
            for key in keys:
                out[key][i, j] = float(res[key])
    return out


def size_matched_random_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random 0/1 mask (float32) keeping exactly as many heads in every layer as ``mask`` does.

    The kept heads of each layer are a uniformly random subset of that size (the heads ranked by a
    random permutation drawn from ``rng``); layers that keep all or none of their heads are unchanged.
    """
    counts = _kept_per_layer(mask)
    ranks = rng.random(np.shape(mask)).argsort(axis=1).argsort(axis=1)
    return (ranks < counts[:, None]).astype(np.float32)


def random_mask_seeds(stage_seed: int, n: int) -> list[int]:
    """``n`` seeds of the random masks, derived from the stage seed (the first ``k`` do not depend on ``n``)."""
    if n <= 0:
        return []
    words = np.random.SeedSequence([int(stage_seed) & 0xFFFFFFFF, RANDOM_MASK_WORD]).generate_state(n, np.uint32)
    return [int(w) for w in words]


def random_mask_rng(seed: int, language: str) -> np.random.Generator:
    """The generator of one random mask: ``default_rng([seed, crc32(language)])``."""
    return np.random.default_rng([int(seed), zlib.crc32(language.encode("utf-8"))])


def random_baseline(own: np.ndarray, random: np.ndarray) -> dict[str, np.ndarray]:
    """Summaries of the size-matched random masks.

    ``own``: [S, C] perplexity of each language's own mask; ``random``: [S, R, C] perplexity of its
    ``R`` random masks. Returns [S, C] matrices ``perplexity_mean``, ``perplexity_std`` (sample
    standard deviation, ddof 1; NaN when R = 1), ``perplexity_min``, ``perplexity_max`` and
    ``relative_to_random`` = own / mean.
    """
    own = np.asarray(own, dtype=np.float64)
    random = np.asarray(random, dtype=np.float64)
    if random.ndim != 3 or random.shape[0] != own.shape[0] or random.shape[2] != own.shape[1] or not random.shape[1]:
        raise ValueError(f"random perplexities {random.shape} must be [rows, seeds, cols] matching own {own.shape}")
    n = random.shape[1]
    mean = random.mean(axis=1)
    std = random.std(axis=1, ddof=1) if n > 1 else np.full(mean.shape, np.nan)
    return {
        "perplexity_mean": mean,
        "perplexity_std": std,
        "perplexity_min": random.min(axis=1),
        "perplexity_max": random.max(axis=1),
        "relative_to_random": own / mean,
    }


def matrix_csv(row_labels: Sequence[str], col_labels: Sequence[str], values: np.ndarray, corner: str) -> str:
    """A labelled matrix as CSV text (header ``corner,<cols>``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([corner, *col_labels])
    for label, row in zip(row_labels, values, strict=True):
        w.writerow([label, *(repr(float(v)) for v in row)])
    return buf.getvalue()


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _json_matrix(values: np.ndarray) -> list[Any]:
    """A numeric array of any rank as nested lists, non-finite values as null."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        return _finite(float(arr))  # type: ignore[return-value]
    return [_json_matrix(v) for v in arr]


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


class CrossEvalParams(EvalParams):
    """Parameters of the ``cross_eval`` stage."""

    split: Literal["select", "report"] = Field(
        "report",
        description="Half of the test documents to evaluate on: 'report' (default: the masks were chosen on 'select').",
    )
    languages: list[str] | None = Field(None, description="Eval languages (columns); None: every language of the dataset.")
    random_mask_seeds: int = Field(
        5, ge=0, description="Size-matched random masks per language mask (0: none); each is evaluated on every column."
    )
    seed: int | None = Field(None, description="Seed of the random masks; None: the job's seed.")


class _CellEvaluator:
    """Evaluates one (mask, eval language) cell of ``cross_eval`` and memoises it by the mask's
    values, so that identical masks (an all-ones mask and the full model excepted) run once."""

    def __init__(
        self, model: Any, batches: Mapping[str, list[dict[str, Any]]], params: CrossEvalParams, on_cell: Callable[[], None]
    ) -> None:
        self.model = model
        self.batches = batches
        self.params = params
        self.on_cell = on_cell
        self.tokens: dict[str, int] = {}
        self._memo: dict[tuple[bytes | None, str], dict[str, float]] = {}

    def __call__(self, mask: np.ndarray | None, lang: str) -> Mapping[str, float]:
        key = (None if mask is None else np.asarray(mask, dtype=np.float32).tobytes(), lang)
        if key not in self._memo:
            self._memo[key] = self._evaluate(mask, lang)
        self.on_cell()
        return self._memo[key]

    def _evaluate(self, mask: np.ndarray | None, lang: str) -> dict[str, float]:
        from stages.gating import HeadGates
        from stages.mlm import bootstrap_seed, evaluate_chunks

        if mask is None:
            chunks = evaluate_chunks(self.model, self.batches[lang])  # the full model: no hooks at all
        else:
            with HeadGates(self.model, mask):
                chunks = evaluate_chunks(self.model, self.batches[lang])
        p = self.params
        lo, hi = chunks.perplexity_interval(bootstrap_seed(p.eval_seed, lang), p.bootstrap_resamples, p.interval_level)
        summary = chunks.summary()
        self.tokens[lang] = int(summary["tokens"])
        return {**summary, "perplexity_lo": lo, "perplexity_hi": hi}


def random_rows(masks: Sequence[tuple[str, np.ndarray]], seeds: Sequence[int]) -> list[tuple[str, np.ndarray | None]]:
    """The size-matched random masks, language by language and seed by seed (``"<lang>#<r>"``)."""
    return [
        (f"{lang}#{r}", size_matched_random_mask(mask, random_mask_rng(seed, lang)))
        for lang, mask in masks
        for r, seed in enumerate(seeds)
    ]


def random_section(
    langs: Sequence[str],
    cols: Sequence[str],
    masks: Sequence[np.ndarray],
    seeds: Sequence[int],
    own: np.ndarray,
    by_seed: np.ndarray,
) -> dict[str, Any]:
    """The ``"random"`` entry of cross_eval.json from the own-mask [S, C] and random [S, R, C] perplexities."""
    summary = random_baseline(own, by_seed)
    return {
        "seeds": list(seeds),
        "rows": list(langs),
        "cols": list(cols),
        "perplexity_by_seed": _json_matrix(by_seed),
        **{key: _json_matrix(value) for key, value in summary.items()},
        "heads_kept_per_layer": {lang: _kept_per_layer(m).tolist() for lang, m in zip(langs, masks, strict=True)},
        "method": (
            "per language mask and seed: a uniformly random mask keeping exactly the same number of heads in every "
            "layer (rng = default_rng([seed, crc32(language)])); perplexity_std is the sample standard deviation "
            "over seeds; relative_to_random = perplexity of the language's own mask / perplexity_mean"
        ),
    }


@stage(
    "cross_eval",
    params=CrossEvalParams,
    inputs={
        "model": Input(type="model"),
        "masks": Input(type="head-mask", many=True),
        "dataset": Input(type="dataset"),
    },
    outputs={"metrics": "metrics"},
    version="2",  # 2: reporting half, bootstrap intervals, size-matched random masks
)
def cross_eval_stage(params: CrossEvalParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Perplexity of every language's subnetwork (rows, + the full model) and of size-matched random
    masks on the reporting half of every language's test documents (columns)."""
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    from stages.mlm import dataset_languages
    from stages.prune import eval_batches_for, eval_tokenizer, load_eval_model

    model_in, data_in = get_input(inputs, "model"), get_input(inputs, "dataset")
    masks = mask_inputs(inputs)
    seed = params.eval_seed
    cols = list(params.languages) if params.languages else dataset_languages(data_in.path)
    model, _ = load_eval_model(model_in.path, ctx.gpus, ctx.job_label)
    shape = (int(model.config.num_hidden_layers), int(model.config.num_attention_heads))
    for lang, mask, _ in masks:
        if mask.shape != shape:
            raise ValueError(f"head mask of {lang!r} has shape {mask.shape}, the model has (layers, heads) {shape}")
    tokenizer = eval_tokenizer(model_in.path, data_in.path)
    batches = {
        lang: eval_batches_for(
            data_in.path,
            lang,
            tokenizer,
            model,
            params.eval_batch_size,
            seed,
            params.max_eval_chunks,
            params.mlm_probability,
            params.split,
        )
        for lang in cols
    }
    rows: list[tuple[str, np.ndarray | None]] = [(lang, mask) for lang, mask, _ in masks] + [(FULL, None)]
    seeds = random_mask_seeds(effective_seed(ctx.seed, params.seed), params.random_mask_seeds)
    randoms = random_rows([(lang, mask) for lang, mask, _ in masks], seeds)
    bar = tqdm(total=(len(rows) + len(randoms)) * len(cols), desc="cross_eval", unit="cell", leave=False)
    evaluator = _CellEvaluator(model, batches, params, lambda: bar.update(1))
    try:
        mats = cross_matrix(rows, cols, evaluator, keys=("loss", "perplexity", "perplexity_lo", "perplexity_hi"))
        rnd = cross_matrix(randoms, cols, evaluator, keys=("perplexity",))["perplexity"] if randoms else None
    finally:
        bar.close()
    labels = [name for name, _ in rows]
    ppl = mats["perplexity"]
    relative = ppl / ppl[-1][None, :]
    for i, row in enumerate(labels):
        ctx.log({f"perplexity/{row}/{col}": float(ppl[i, j]) for j, col in enumerate(cols)})
    out = ctx.output_dir("metrics")
    doc: dict[str, Any] = {
        "row_axis": "subnetwork",
        "col_axis": "eval_language",
        "rows": labels,
        "cols": cols,
        "perplexity": _json_matrix(ppl),
        "loss": _json_matrix(mats["loss"]),
        "perplexity_interval": _json_matrix(np.stack([mats["perplexity_lo"], mats["perplexity_hi"]], axis=-1)),
        "relative_perplexity": _json_matrix(relative),
        "tokens": evaluator.tokens,
        "heads_kept": {
            **{lang: int((m > 0.5).sum()) for lang, m, _ in masks},
            FULL: shape[0] * shape[1],
        },
        "eval_seed": seed,
        "eval_split": params.split,
        "max_eval_chunks": params.max_eval_chunks,
        "mlm_probability": params.mlm_probability,
        "interval": {
            "method": "percentile bootstrap over eval chunks, resamples seeded by (eval_seed, column language)",
            "level": params.interval_level,
            "resamples": params.bootstrap_resamples,
        },
        "random_mask_seeds": params.random_mask_seeds,
    }
    if rnd is not None:
        langs = [lang for lang, _, _ in masks]
        by_seed = rnd.reshape(len(masks), len(seeds), len(cols))
        doc["random"] = random_section(langs, cols, [m for _, m, _ in masks], seeds, ppl[: len(masks)], by_seed)
        rel = np.asarray(doc["random"]["relative_to_random"], dtype=np.float64)
        for i, row in enumerate(langs):
            ctx.log({f"relative_to_random/{row}/{col}": float(rel[i, j]) for j, col in enumerate(cols)})
    write_json(out / "cross_eval.json", doc)
    (out / "cross_eval.csv").write_text(matrix_csv(labels, cols, ppl, "subnetwork"), encoding="utf-8")
    diag = [float(ppl[labels.index(c), j]) for j, c in enumerate(cols) if c in labels[:-1]]
    meta = {
        "rows": labels,
        "cols": cols,
        "eval_seed": seed,
        "eval_split": params.split,
        "mean_diagonal_perplexity": float(np.mean(diag)) if diag else None,
    }
    return {"metrics": meta}


class MaskStatsParams(StageParams):
    """Parameters of the ``mask_stats`` stage."""

    hidden_size: int | None = Field(
        None, ge=1, description="Model hidden size for parameter counts; None: from mask.json (hidden_size)."
    )
    total_params: int | None = Field(
        None, ge=1, description="Model parameter count; None: from mask.json (num_parameters), if any."
    )


@stage(
    "mask_stats",
    params=MaskStatsParams,
    inputs={"masks": Input(type="head-mask", many=True)},
    outputs={"metrics": "metrics"},
    version="2",  # 2: jaccard_chance (size-matched random masks, exact)
)
def mask_stats_stage(params: MaskStatsParams, inputs: Inputs, ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Proportion of heads masked per layer, parameters removed and Jaccard of kept heads per language pair."""
    masks = mask_inputs(inputs)
    langs = [lang for lang, _, _ in masks]
    arrays = [m for _, m, _ in masks]
    hidden = params.hidden_size or _agreed(masks, "hidden_size")
    total = params.total_params or _agreed(masks, "num_parameters")
    stats = mask_statistics(langs, arrays, hidden, total)
    write_json(ctx.output_dir("metrics") / "mask_stats.json", stats)
    ctx.log({f"heads_kept/{lang}": float(n) for lang, n in stats["heads_kept"].items()})
    ctx.log({f"masked_per_layer/{i}": float(v) for i, v in enumerate(stats["masked_per_layer"])})
    keys = ("languages", "heads_kept", "jaccard_min", "jaccard_max", "jaccard_mean", "jaccard_chance_mean")
    meta = {k: stats[k] for k in keys}
    return {"metrics": meta}


def _agreed(masks: Sequence[tuple[str, np.ndarray, dict[str, Any]]], key: str) -> int | None:
    """The value of ``key`` in the masks' mask.json, when present and the same in all of them."""
    values = {int(info[key]) for _, _, info in masks if info.get(key) is not None}
    if len(values) > 1:
        raise ValueError(f"head masks disagree on {key}: {sorted(values)}; they come from different models")
    return values.pop() if values else None


CROSS_EVAL: StageDef = cross_eval_stage
MASK_STATS: StageDef = mask_stats_stage
