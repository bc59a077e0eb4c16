"""Pruning loop: one pass per mask (the prune stage) vs a faithful two-pass, run_bertology-style loop.

Every loop runs on the same model, the same deterministically masked batches and the same head
gates (``stages.gating.HeadGates``), with the same rule (P0, T = P0 x threshold, k heads per step,
normalisation over all heads, the last accepted mask), so all must end with the same mask:

- ours: ``stages.prune.prune_model``, what the ``prune`` stage runs: each mask visited is measured
  by one ``gated_pass`` (forward to the masked-position losses + ``autograd.grad`` to the gates)
  that gives its perplexity and the importance under it; a mask after which no step can follow is
  measured by a forward only;
- two-pass, project passes: P0 by ``stages.mlm.evaluate``, then per step ``head_importance`` under
  the current mask and a separate ``evaluate`` under the new mask (the stage before issue 17);
- two-pass, run_bertology passes: the same loop with run_bertology's computations: importance by a
  plain forward+backward (every parameter and the gates require grad, logits at every position,
  ``model(..., labels).loss.backward()``, gate gradients taken per batch, as the project does), and
  scoring by a no-grad ``model(..., labels)`` (logits at every position), perplexity =
  exp(token-weighted mean of the batch losses).

Models: (a) ``xlmr``: XLM-R-base-shaped, randomly initialised, random token ids (as
bench/importance.py; ``--quick``: hidden 256, 4 layers x 4 heads, vocabulary 30,000, masking_amount
0.25); (b) ``demo``:
specs/demo.yaml's model config: the trained demo model of a demo store (``--demo-store DIR``, its
``demo.train.model`` and the first ``max_eval_chunks`` chunks of the language's held-out half from
``demo.tokenize.dataset``), else randomly initialised with the demo's vocabulary (8,000) and blocks
(128) on random ids. Settings: the study's (threshold 1.1, masking_amount 0.1 for xlmr) and the
demo's (threshold 1.1, masking_amount 0.125, 16 chunks in batches of 8).

Scenarios: ``min_heads``: the loop runs to min_heads (on a random model the perplexity hardly moves,
so nothing is rejected); ``reject``: the threshold is set between the perplexities of two steps of
ours' own trajectory, so that some steps are accepted and the next is rejected (the study's pattern:
1-2 accepted steps). Each loop is warmed up once, then the loops are timed in turn ``--repeats``
rounds, best round reported. Also reported: what stacking two masks' examples in one batch
(per-example gates) could at most gain: one ``gated_pass`` over batches of 2B chunks against one
over the same chunks in batches of B.

    python bench/prune_loop.py --demo-store /tmp/demo-store   # ~15 minutes on 2 quiet CPUs (--skip bertology: ~5)
    python bench/prune_loop.py --quick --threads 1            # ~1 minute
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from common import header, table, verdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from importance import FULL_SHAPE, QUICK_SHAPE, make_batches, make_model, masked_tokens, plain_forward_backward  # noqa: E402

from stages.eval_model import count_parameters  # noqa: E402
from stages.gating import HeadGates, gate_shape  # noqa: E402
from stages.mlm import configure_threads, eval_batches, evaluate  # noqa: E402
from stages.prune import gated_pass, head_importance, prune_model  # noqa: E402
from stages.prune_loop import heads_per_step, next_mask, normalize_importance  # noqa: E402

Batch = Mapping[str, Any]
DEMO_SHAPE = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256, "vocab_size": 8000}
Outcome = tuple[np.ndarray, list[tuple[int, float, bool]]]  # final mask; (heads kept, perplexity, accepted) per point


# ------------------------------------------------------------------------------------------ loops
def two_pass_loop(
    shape: tuple[int, int],
    importance_fn: Callable[[np.ndarray], np.ndarray],
    perplexity_fn: Callable[[np.ndarray], float],
    threshold: float,
    masking_amount: float,
    min_heads: int,
) -> Outcome:
    """The faithful loop: P0 by a scoring pass; per step importance under the current mask, then a
    separate scoring pass under the new mask; the last accepted mask."""
    mask = np.ones(shape, np.float32)
    k = heads_per_step(*shape, masking_amount)
    p0 = perplexity_fn(mask.copy())
    limit = p0 * threshold
    trajectory = [(int(mask.sum()), p0, True)]
    while int(mask.sum()) - k >= min_heads:
        imp = normalize_importance(importance_fn(mask.copy()), mask=mask)
        candidate = next_mask(mask, imp, k)
        ppl = perplexity_fn(candidate.copy())
        accepted = math.isfinite(ppl) and ppl <= limit
        trajectory.append((int(candidate.sum()), ppl, accepted))
        if not accepted:
            break
        mask = candidate
    return mask, trajectory


def project_passes(model: Any, batches: Sequence[Batch], threshold: float, amount: float, min_heads: int) -> Outcome:
    """Two-pass loop with the project's passes (head_importance, evaluate): the stage before issue 17."""
    with HeadGates(model) as gates:

        def importance_fn(mask: np.ndarray) -> np.ndarray:
            gates.set(mask)
            return head_importance(model, gates, batches)

        def perplexity_fn(mask: np.ndarray) -> float:
            gates.set(mask)
            return float(evaluate(model, batches)["perplexity"])

        return two_pass_loop(gate_shape(model), importance_fn, perplexity_fn, threshold, amount, min_heads)


def bertology_passes(model: Any, batches: Sequence[Batch], threshold: float, amount: float, min_heads: int) -> Outcome:
    """Two-pass loop with run_bertology's passes (all gradients, logits at every position)."""
    with HeadGates(model) as gates:

        def importance_fn(mask: np.ndarray) -> np.ndarray:
            gates.set(mask)
            return plain_forward_backward(model, gates, batches)

        def perplexity_fn(mask: np.ndarray) -> float:
            gates.set(mask)
            total, tokens = 0.0, 0
            with torch.no_grad():
                for batch in batches:
                    n = masked_tokens(batch)
                    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
                    total, tokens = total + float(out.loss) * n, tokens + n
            return math.exp(total / tokens)

        return two_pass_loop(gate_shape(model), importance_fn, perplexity_fn, threshold, amount, min_heads)


def ours(model: Any, batches: Sequence[Batch], threshold: float, amount: float, min_heads: int) -> Outcome:
    """The prune stage's loop."""
    res = prune_model(model, batches, threshold, amount, min_heads)
    return res.mask, [(s.heads_kept, s.perplexity, s.accepted) for s in res.trajectory]


LOOPS: dict[str, Callable[..., Outcome]] = {"ours": ours, "project": project_passes, "bertology": bertology_passes}
LABELS = {
    "ours": "ours: prune_model (one gated_pass per mask)",
    "project": "two-pass, project passes (head_importance + evaluate)",
    "bertology": "two-pass, run_bertology passes (all grads, full logits)",
}


# ------------------------------------------------------------------------------------------ setups
def random_setup(shape: Mapping[str, int], n_chunks: int, batch_size: int, seq_len: int) -> tuple[Any, list[dict[str, Any]]]:
    """A randomly initialised model of ``shape`` and masked random chunks."""
    model = make_model(shape, seq_len)
    return model, make_batches(shape["vocab_size"], n_chunks // batch_size, batch_size, seq_len)


def demo_setup(store: Path, language: str, n_chunks: int, batch_size: int) -> tuple[Any, list[dict[str, Any]], str]:
    """The trained demo model of a demo store and masked chunks of the language's held-out half."""
    from stages.mlm import load_model, load_tokenizer, special_token_ids

    root = store / "artifacts" / "materialized"
    model_dir, data_dir = root / "demo.train.model" / "v0", root / "demo.tokenize.dataset" / "v0"
    try:
        from stages.formats.dataset import load_split

        chunks, half = np.asarray(load_split(data_dir, language, "select")), "select"
    except Exception:  # a store of an older demo: one test.npy per language
        chunks, half = np.load(data_dir / language / "test.npy"), "test"
    tok = load_tokenizer(model_dir)
    batches = eval_batches(
        chunks[:n_chunks], tok.mask_token_id, special_token_ids(tok), len(tok), batch_size, seed=1234,
        language=language, pad_token_id=tok.pad_token_id,
    )
    return load_model(model_dir).eval(), batches, f"trained demo model of {store} ({language}, {half} half)"


def rebatch(batches: Sequence[Batch], size: int) -> list[dict[str, Any]]:
    """The same rows in batches of ``size``."""
    keys = ("input_ids", "attention_mask", "labels")
    whole = {k: torch.cat([b[k] for b in batches]) for k in keys}
    n = len(whole["input_ids"])
    return [{k: whole[k][i : i + size] for k in keys} for i in range(0, n, size)]


# ------------------------------------------------------------------------------------------ timing
def reject_threshold(trajectory: Sequence[tuple[int, float, bool]]) -> float | None:
    """A threshold that accepts the first steps and rejects a later one (None if the perplexity never rises)."""
    ppl = [p for _, p, _ in trajectory]
    for j in list(range(1, len(ppl) - 1)) + [0]:
        if ppl[j + 1] > max(ppl[: j + 1]):
            return (max(ppl[: j + 1]) + ppl[j + 1]) / 2 / ppl[0]
    return None


def time_loops(
    model: Any, batches: Sequence[Batch], settings: tuple[float, float, int], repeats: int, loops: Sequence[str]
) -> tuple[dict[str, float], dict[str, Outcome]]:
    """Best round of each loop (taken in turn) and each loop's outcome."""
    best = dict.fromkeys(loops, math.inf)
    out: dict[str, Outcome] = {}
    for _ in range(repeats):
        for name in loops:
            t0 = time.perf_counter()
            out[name] = LOOPS[name](model, batches, *settings)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, out


def stacking_ceiling(model: Any, batches: Sequence[Batch], repeats: int) -> float:
    """Seconds of one gated_pass over the rows in batches of B / in batches of B/2 (best of each): how much
    one pass over a batch holding two masks' halves could save against two passes of a half each."""
    size = len(batches[0]["input_ids"])
    small, big = rebatch(batches, max(1, size // 2)), rebatch(batches, size)
    best = {"small": math.inf, "big": math.inf}
    with HeadGates(model) as gates:
        for _ in range(repeats):
            for name, bs in (("small", small), ("big", big)):
                t0 = time.perf_counter()
                gated_pass(model, gates, bs)
                best[name] = min(best[name], time.perf_counter() - t0)
    return best["big"] / best["small"]


def compare(outcomes: Mapping[str, Outcome]) -> str:
    """Masks identical to ours? Largest relative difference of the per-step perplexities."""
    mask, traj = outcomes["ours"]
    notes = []
    for name, (m, t) in outcomes.items():
        if name == "ours":
            continue
        same_mask = np.array_equal(m, mask)
        same_path = [(h, a) for h, _, a in t] == [(h, a) for h, _, a in traj]
        rel = max(abs(p - q) / q for (_, p, _), (_, q, _) in zip(t, traj, strict=False)) if len(t) == len(traj) else math.inf
        state = "IDENTICAL" if same_mask and same_path else "DIFFERENT"
        notes.append(f"{name}: final mask and steps {state} to ours; max relative perplexity difference {rel:.1e}")
    return "\n".join(notes)


def bench_model(
    title: str, model: Any, batches: Sequence[Batch], threshold: float, amount: float, args: argparse.Namespace
) -> bool:
    """Both scenarios on one model; prints the tables; True when every loop ended with ours' mask."""
    n_masked = sum(masked_tokens(b) for b in batches)
    layers, heads = gate_shape(model)
    header(
        f"{title}: {layers} layers x {heads} heads, {count_parameters(model) / 1e6:.1f}M parameters; {len(batches)} batches "
        f"({sum(len(b['input_ids']) for b in batches)} chunks x {batches[0]['input_ids'].shape[1]} tokens, {n_masked} masked); "
        f"k = {heads_per_step(layers, heads, amount)} heads per step"
    )
    loops = [name for name in LOOPS if name not in args.skip]
    k = heads_per_step(layers, heads, amount)
    for name in loops:  # warm-up: one step on one batch
        LOOPS[name](model, batches[:1], 1e9, amount, layers * heads - k)
    ok = True
    scenarios: list[tuple[str, float]] = [("min_heads", 1e9)]
    first: dict[str, Outcome] = {}
    for scenario, thr in scenarios:
        best, outcomes = time_loops(model, batches, (thr, amount, 1), args.repeats, loops)
        first = first or outcomes
        traj = outcomes["ours"][1]
        accepted = sum(a for _, _, a in traj[1:])
        print(f"\nscenario {scenario}: threshold {thr:.6g}; {accepted} steps accepted, {len(traj) - 1 - accepted} rejected; "
              f"{int(outcomes['ours'][0].sum())} heads kept")
        rows = [[LABELS[n], round(t, 2), round(best["ours"] / t, 3)] for n, t in best.items()]
        print(table(["loop", "seconds", "ours / loop"], rows))
        print(compare(outcomes))
        ok = ok and all(np.array_equal(m, outcomes["ours"][0]) for m, _ in outcomes.values())
        if scenario == "min_heads":
            reject = reject_threshold(traj) if threshold >= 1e9 else threshold
            if reject is not None:
                scenarios.append(("reject", reject))
    ratio = stacking_ceiling(model, batches, args.repeats)
    print(f"\nper-example gates, the most they could save: a gated_pass in batches of B takes {ratio:.2f}x one in B/2")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="xlmr: hidden 256, 4 x 4 heads, vocabulary 30,000, 4 heads a step")
    parser.add_argument("--chunks", type=int, default=8, help="xlmr: evaluation chunks (batches of 8 x 128 tokens)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (best of)")
    parser.add_argument("--demo-store", type=Path, help="a store holding the demo's trained model (demo.train.model)")
    parser.add_argument("--language", default="es", help="demo: the language whose held-out chunks drive pruning")
    parser.add_argument("--skip", nargs="*", default=[], choices=["project", "bertology"], help="leave loops out")
    parser.add_argument("--only", choices=["xlmr", "demo"], help="one model only")
    parser.add_argument("--threads", type=int, help="torch threads (default: the CPUs; 1 is steadier on a busy machine)")
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    print(f"torch {torch.__version__}, {threads} threads")
    ok = True
    if args.only != "demo":
        shape = QUICK_SHAPE if args.quick else FULL_SHAPE
        model, batches = random_setup(shape, args.chunks, 8, 128)
        title = f"xlmr ({'quick shape' if args.quick else 'XLM-R base shape'}, random init)"
        ok &= bench_model(title, model, batches, 1e9, 0.25 if args.quick else 0.1, args)
    if args.only != "xlmr":
        if args.demo_store is not None:
            model, batches, title = demo_setup(args.demo_store, args.language, 16, 8)
            ok &= bench_model(f"demo ({title})", model, batches, 1.1, 0.125, args)
        else:
            model, batches = random_setup(DEMO_SHAPE, 16, 8, 128)
            ok &= bench_model("demo (specs/demo.yaml model config, random init)", model, batches, 1e9, 0.125, args)
    print(f"\nevery loop ended with ours' mask: {verdict(ok)}")


if __name__ == "__main__":
    main()
