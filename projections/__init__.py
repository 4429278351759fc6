"""What it means: pure folds from events to state, history, checkpoints and records."""
