"""Evaluate clean and attacked: ``python test.py --config config/<dataset>/<exp>.yaml [key=value ...]``."""
import sys

from engine.cli import main


def run(cfg) -> dict:
    """Evaluate; torch and the models load only once the config has been validated."""
    from engine.evaluator import run_test
    return run_test(cfg)


if __name__ == "__main__":
    sys.exit(main("test", run))
