"""Reading diagnoses against each other: :class:`~alibi_surgery.analysis.comparison.Comparison` and ``compare()``
(before/after, targets, zone, drift), the cross-scale table of several checkpoints (``scale_table``), several
conditions against one stock model (``panels``), drift over a repair run's checkpoints (``drift``), perplexity
(``perplexity``) and the chunked LM-head loss it and the trainer share (``loss``)."""
