"""Surgery: plans and their memory, re-initialisation, head-sliced parameters and AdamW, the learning-rate schedule,
the trainer with its checkpoints, ``repair()`` and its report (the head-selection grammar is
:mod:`alibi_surgery.diagnosis.selection`, the chunked loss :mod:`alibi_surgery.analysis.loss`)."""
