"""llmctl's trainer: everything that runs inside the pods, plus the torch-free plan math (plan.py)."""
