"""How it runs: Engine, workers, actors, StepContext and handles."""
