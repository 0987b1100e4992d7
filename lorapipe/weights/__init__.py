"""The weights stage: the tiny base, HF <-> MindSpore conversion, and training checkpoints -> one model."""
