"""Head diagnosis: prompt batching and ``diagnose()``, the streamed block-by-block variant, the paper's metrics and
classes (:class:`~alibi_surgery.diagnosis.report.HeadReport`), the built-in prompt set, the MLP dormancy figure
(``dormancy``) and the head-selection grammar every later layer names heads with (``selection``)."""
