r"""csl_jax entry point: parses flags and hands over to the package.

    python main.py --config=configs/csl_cityscapes.py:1_16 --workdir=runs/city_1_16 \
        --config.data.root=/data/tfds [--config.optim.lr=0.004 ...]
    python main.py --config=... --workdir=runs/city_1_16 --mode=eval [--checkpoint=best|latest|PATH]
    python main.py --config=... --workdir=runs/city_1_16 --mode=predict --input=imgs/ --output=out/
"""

import importlib.util
import logging as std_logging

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py (`path.py:arg` variants).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"], "What to do.")
flags.DEFINE_string("checkpoint", "best",
                    "eval/predict: 'best' or 'latest' checkpoint of --workdir, or a converted variables file.")
flags.DEFINE_string("input", None, "predict: folder of images to segment.")
flags.DEFINE_string("output", None, "predict: folder for masks and overlays (default WORKDIR/predictions).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host). SLURM, Open MPI, "
                  "Kubernetes and TPU pods are detected; elsewhere give the three flags below.")
flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "--distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "--distributed: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
    """Keeps orbax's per-save INFO chatter out of the training log (warnings still pass)."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    import jax

    if FLAGS.distributed:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    from csl_jax import run_info

    config = FLAGS.config
    run_info.prepare(config, FLAGS.workdir, FLAGS.mode)
    if FLAGS.mode == "train":
        from csl_jax import train

        results = train.train_and_evaluate(config, FLAGS.workdir)
        if results:
            print(f"final val mIoU {100 * results['miou']:.2f}, best {100 * results['best_miou']:.2f} "
                  f"({results['protocol']['name']}, {results['num_images']} images); see {FLAGS.workdir}")
    else:
        from csl_jax import evaluation_loop

        if FLAGS.mode == "eval":
            evaluation_loop.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.checkpoint)
        else:
            if not FLAGS.input:
                raise app.UsageError("--mode=predict needs --input=FOLDER")
            evaluation_loop.predict(config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.input, FLAGS.output)


def _unknown_override(argv) -> str | None:
    """A message naming the first `--config.a.b=v` override whose key the config lacks, or None."""
    spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
    if spec is None:
        return None
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_config_for_check", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for flag in argv[1:]:
        if not flag.startswith("--config."):
            continue
        keys = flag[len("--config."):].split("=", 1)[0].split(".")
        node = config
        for depth, key in enumerate(keys):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                where = ".".join(["config", *keys[:depth]])
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                return f"{flag}: {where} has no key {key!r}; valid keys: {valid}"
            node = node[key]
    return None


def parse_flags(argv):
    """absl flag parsing with a clear message for config overrides of unknown keys."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as error:
        message = _unknown_override(argv)
        if message is None:
            raise
        raise SystemExit(f"error: {message}") from error


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
