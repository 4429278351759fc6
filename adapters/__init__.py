"""Storage ports and their backends: memory (the reference), sqlite."""
