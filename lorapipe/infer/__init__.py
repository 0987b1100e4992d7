"""The trained model in use: generation, predict and evaluation."""
