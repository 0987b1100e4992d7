"""The training stage: the MindFormers YAML, the rank table, the checks before any rank, the launch, the ranks."""
