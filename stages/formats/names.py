"""Names that several artifact formats share: the model variants, the similarity measures and the floor kinds.

``full`` is the unpruned model: the last row of cross_eval.json, the variant of its encodings and a
model of similarity.json; ``subnetwork``, ``base`` and ``random`` are the other variants that encode
writes and similarity compares. The measures and the floor kinds are keys of similarity.json.
"""

from __future__ import annotations

from typing import Literal

FULL = "full"
SUBNETWORK = "subnetwork"
BASE = "base"
RANDOM = "random"
Variant = Literal["full", "subnetwork", "base", "random"]
VARIANTS: tuple[str, ...] = (FULL, SUBNETWORK, BASE, RANDOM)  # "full" first: every other model is paired with it
CONTROLS = (BASE, RANDOM)  # the control models (what architecture and tokenisation alone give, no fine-tuning)
MODEL_LABELS = {
    FULL: "full fine-tuned model",
    SUBNETWORK: "language subnetworks",
    BASE: "base model (control)",
    RANDOM: "random-init model (control)",
}

Measure = Literal["cka", "cka_debiased", "rsa", "isomorphism"]
MEASURES: tuple[Measure, ...] = ("cka", "cka_debiased", "rsa", "isomorphism")

LENGTH_FLOOR = "length_matched"
SHUFFLED_FLOOR = "shuffled"
FLOOR_KINDS = (LENGTH_FLOOR, SHUFFLED_FLOOR)
