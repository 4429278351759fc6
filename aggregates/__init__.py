"""What happened: the StepExecution aggregate and its events (pure, no I/O)."""
