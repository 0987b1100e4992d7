"""The trained model in use: generation, predict, evaluation and the standard benchmarks."""
