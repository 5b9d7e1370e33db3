"""Files and checkpoints: loading with one-line refusals, safetensors header checks, atomic writes, corpora, the
output-directory lock, and random checkpoints of every family's shapes."""
