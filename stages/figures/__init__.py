"""The study's figures: one pure function per figure, plain data in, a matplotlib ``Figure`` out.

One module per family, and what they share:

- :mod:`.base`: style and saving (:func:`save`: byte-identical PNG and PDF for identical data), colours and
  markers per language, titles, legends, heatmap cells, interval lines, Pearson r with its interval;
- :mod:`.finetuning`: perplexity before and after fine-tuning, the training curve;
- :mod:`.subnetworks`: the cross-evaluation heatmaps, the Jaccard of kept heads, heads masked per layer,
  the pruning trajectories;
- :mod:`.similarity`: full x subnetwork layer heatmaps, similarity curves, subnetworks minus full
  model, similarity against syntactic distance, token overlap.

This package re-exports the public functions, so that ``from stages import figures as F`` reaches every
figure and ``F.save``/``F.style`` (the report draws and saves through them). Importing it imports
matplotlib: the stages import it inside their functions only, so that planning a study stays cheap.
"""

from __future__ import annotations

import matplotlib as matplotlib

from stages.figures.base import DPI as DPI
from stages.figures.base import FORMATS as FORMATS
from stages.figures.base import as_array as as_array
from stages.figures.base import diverging_scale as diverging_scale
from stages.figures.base import format_r as format_r
from stages.figures.base import language_colors as language_colors
from stages.figures.base import pearson_ci as pearson_ci
from stages.figures.base import pearson_r as pearson_r
from stages.figures.base import save as save
from stages.figures.base import study_order as study_order
from stages.figures.base import style as style
from stages.figures.base import wrap_title as wrap_title
from stages.figures.finetuning import perplexity_before_after as perplexity_before_after
from stages.figures.finetuning import training_curve as training_curve
from stages.figures.similarity import cka_layer_heatmaps as cka_layer_heatmaps
from stages.figures.similarity import similarity_curves as similarity_curves
from stages.figures.similarity import similarity_differences as similarity_differences
from stages.figures.similarity import similarity_vs_distance as similarity_vs_distance
from stages.figures.similarity import token_overlap_bars as token_overlap_bars
from stages.figures.subnetworks import cross_eval_heatmap as cross_eval_heatmap
from stages.figures.subnetworks import jaccard_heatmap as jaccard_heatmap
from stages.figures.subnetworks import masked_per_layer as masked_per_layer
from stages.figures.subnetworks import pruning_trajectories as pruning_trajectories
