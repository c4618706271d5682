"""Train a segmentation model: ``python train.py --config config/<dataset>/<exp>.yaml [key=value ...]``."""
import sys

from engine.cli import main
from engine.trainer import Trainer

if __name__ == "__main__":
    sys.exit(main("train", lambda cfg: Trainer(cfg).fit()))
