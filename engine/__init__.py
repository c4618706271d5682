"""The loops: training (trainer.py) and clean/attacked evaluation (evaluator.py)."""
