"""Surgery: the head-selection grammar, plans and their memory, re-initialisation, head-sliced parameters and AdamW,
the chunked loss, the learning-rate schedule, the trainer with its checkpoints, ``repair()`` and its report."""
