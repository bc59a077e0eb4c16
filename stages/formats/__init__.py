"""What stages hand to each other: one module per artifact type, owning its file names, its writer and its readers.

An artifact's layout used to be known separately by the stage that writes it and by every stage that
reads it; here each type has one module, and both sides import it:

- :mod:`.names`: the names several formats share (model variants, similarity measures, floor kinds);
- :mod:`.hf`: the on-disk form of the three text and token types below: ``datasets`` directories
  (``save_to_disk``; ``datasets.load_from_disk`` opens each), written deterministically;
- :mod:`.corpus` (``corpus``: stage ``corpus`` -> ``tokenizer``, ``tokenize``);
- :mod:`.dataset` (``dataset``: stage ``tokenize`` -> ``train``, ``prune``, ``cross_eval``);
- :mod:`.parallel` (``parallel-corpus``: stage ``parallel`` -> ``encode``, ``token_overlap``);
- :mod:`.masks` (``head-mask``: stage ``prune`` -> ``cross_eval``, ``mask_stats``, ``encode``, ``report``,
  ``sweep_summary``);
- :mod:`.encodings` (``encodings``: stage ``encode`` -> ``similarity``);
- :mod:`.metrics` (the JSON tables of ``metrics`` artifacts and the model's metrics.json -> ``report``,
  ``sweep_summary``).

The package is called ``formats``, not ``artifacts``, to keep it apart from :mod:`orchestrator.artifacts`,
which stores any artifact's files without knowing what is in them. What is in them is decided here.
Every module is cheap to import (the standard library and :mod:`orchestrator.stage` at module level,
numpy inside the functions): the engine imports the stage modules, and with them these, to plan studies.
"""
