"""Reading diagnoses against each other: :class:`~alibi_surgery.analysis.comparison.Comparison` and ``compare()``
(before/after, targets, zone, drift), and the cross-scale table of several checkpoints (``scale_table``)."""
