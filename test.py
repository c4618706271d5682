"""Evaluate clean and attacked: ``python test.py --config config/<dataset>/<exp>.yaml [key=value ...]``."""
import sys

from engine.cli import main
from engine.evaluator import run_test

if __name__ == "__main__":
    sys.exit(main("test", run_test))
