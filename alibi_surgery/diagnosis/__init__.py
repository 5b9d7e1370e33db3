"""Head diagnosis: prompt batching and ``diagnose()``, the streamed block-by-block variant, the paper's metrics and
classes (:class:`~alibi_surgery.diagnosis.report.HeadReport`), and the built-in prompt set."""
