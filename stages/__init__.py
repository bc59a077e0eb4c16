"""The science: one module per stage family. Nothing here knows about SLURM, W&B or the store.

``registry()`` is the one entry point the engine uses; stage modules import heavy libraries
(torch, transformers, datasets) inside their functions only, so building the registry is cheap.
What the stages hand to each other (the files of each artifact type) is laid out in :mod:`stages.formats`.
"""

from __future__ import annotations

from orchestrator.stage import Registry

__cross_lingual_subnets__ = True  # this project's stages: another package named `stages` is refused (orchestrator.stage_origin)


def registry() -> Registry:
    """Every stage of the study, by name."""
    from stages import (
        controls,
        corpus,
        dataset,
        encode,
        evaluate,
        mask_stats,
        parallel,
        prune,
        report,
        similarity,
        sweep_summary,
        tokenizer,
        train,
    )

    return Registry(
        [
            corpus.CORPUS,
            tokenizer.TOKENIZER,
            dataset.TOKENIZE,
            train.TRAIN,
            prune.PRUNE,
            evaluate.CROSS_EVAL,
            mask_stats.MASK_STATS,
            report.REPORT,
            parallel.PARALLEL,
            encode.ENCODE,
            similarity.SIMILARITY,
            controls.TOKEN_OVERLAP,
            controls.LANGUAGE_DISTANCE,
            sweep_summary.SWEEP_SUMMARY,
        ]
    )
