"""Evaluate clean and attacked: ``python test.py --config config/<dataset>/<exp>.yaml [key=value ...]``;
``--merge DIR...`` combines the result folders of ``test.shard`` runs instead."""
import sys

from engine.cli import main


def run(cfg, merge=None) -> dict:
    """Evaluate (or merge shards); torch and the models load only once the config has been validated."""
    if merge:
        from engine.shards import merge_shards
        return merge_shards(cfg, merge)
    from engine.evaluator import run_test
    return run_test(cfg)


if __name__ == "__main__":
    sys.exit(main("test", run))
