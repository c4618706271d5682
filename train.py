"""Train a segmentation model: ``python train.py --config config/<dataset>/<exp>.yaml [key=value ...]``."""
import sys

from engine.cli import main


def run(cfg) -> None:
    """Train; torch and the models load only once the config has been validated."""
    from engine.trainer import Trainer
    Trainer(cfg).fit()


if __name__ == "__main__":
    sys.exit(main("train", run))
