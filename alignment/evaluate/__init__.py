"""Evaluation: the metrics every stage reports (`metrics.py`), and `vlm-align eval` (`command.py`), which runs a
trained stage's own evaluation again on any split or data source.

`from alignment.evaluate import exact_match, ...` gives the metrics; the command is imported where it runs.
"""

from alignment.evaluate.metrics import (
    answer_metrics,
    exact_match,
    generate_answers,
    mean_words,
    normalize_answer,
    preference_metrics,
    rejection_type,
)

__all__ = ["answer_metrics", "exact_match", "generate_answers", "mean_words", "normalize_answer",
           "preference_metrics", "rejection_type"]
