"""The engine, the only door to the model: preparation, the injection guard, scheduling, fairness, sequences,
GPU start-up and warm-up. Transport-free: it takes and returns domain objects."""
