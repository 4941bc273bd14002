r"""csl_jax entry point: parses flags and hands over to the package.

    python main.py --config=configs/csl_cityscapes.py:1_16 --workdir=runs/city_1_16 \
        --config.data.root=/data/csl [--config.optim.lr=0.004 ...]
    python main.py --workdir=runs/city_1_16 --mode=eval [--checkpoint=best|latest|PATH] \
        [--split=val|test] [--evaluation=student]
    python main.py --workdir=runs/city_1_16 --mode=predict --input=imgs/ --output=out/
    python main.py --config=configs/csl_cityscapes.py:1_16 --mode=config [--config.optim.lr=0.004 ...]

A command-line mistake (a flag, the config file, an override, a setting, a busy workdir, initial
weights that are neither cached nor downloadable) ends in one line `error: ...` on stderr and exit
code 2, before anything is written or compiled.
"""

import atexit
import difflib
import importlib.util
import logging as std_logging
import os
import re
import sys
from typing import NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

import csl_jax.workdir as workdir_lib

FLAGS = flags.FLAGS
MODES = ("train", "eval", "predict", "config")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py (`path.py:arg` variants). "
                                "Optional for --mode=eval/predict on a workdir with a config.json.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results (not needed for --mode=config).")
flags.DEFINE_enum("mode", "train", MODES,
                  "train: train, or resume the run in --workdir; eval/predict: a checkpoint of the run in --workdir, "
                  "with the run's own config.json (only --config.eval.* and data.root-like overrides apply); "
                  "config: print the resolved config (--config after its overrides) as JSON and exit, touching "
                  "no workdir.")
flags.DEFINE_string("checkpoint", "best",
                    "eval/predict: 'best' or 'latest' checkpoint of --workdir, or a converted variables file.")
flags.DEFINE_string("split", "", "eval: the split to evaluate, 'val' or 'test' where prepared (default: the "
                    "evaluation's, val).")
flags.DEFINE_string("evaluation", "", "eval/predict: PREDICT[@SPLIT][:PROTOCOL], e.g. 'student' or 'teacher:sliding' "
                    "(default: the run's best evaluation, config.eval.best).")
flags.DEFINE_string("input", None, "predict: folder of images to segment.")
flags.DEFINE_string("output", None, "predict: folder for masks and overlays (default WORKDIR/predictions).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host). SLURM, Open MPI, "
                  "Kubernetes and TPU pods are detected; elsewhere give the three flags below.")
flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "--distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "--distributed: this process's index.")


class _QuietLibraries(std_logging.Filter):
    """Keeps orbax's per-save INFO chatter out of the training log (warnings still pass)."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def usage_error(message: str) -> NoReturn:
    """Ends the program with `error: message` on stderr and exit code 2: one line, or (a refused resume)
    a line followed by its indented list of keys."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv):
    del argv  # parse_flags refused positional arguments
    logging.get_absl_handler().addFilter(_QuietLibraries())
    mode, workdir = FLAGS.mode, FLAGS.workdir
    config = checked(FLAGS.config if mode in ("train", "config") else evaluation_config(workdir, mode))
    if mode == "config":
        print(workdir_lib.config_to_json(config))
        return
    if mode != "train":
        check_eval_flags(workdir, config)
    elif not workdir_lib.has_trained_state(workdir):  # a fresh run's initial weights (config.model.init_from),
        from csl_jax.models import pretrained  # downloaded now: missing ones fail before anything is written

        try:
            pretrained.check_available(config.model)
        except (ValueError, OSError) as error:
            usage_error(str(error))
    import jax

    if FLAGS.distributed:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    from csl_jax import data, run_info
    from csl_jax.checkpoint import CheckpointDamagedError, CheckpointWriteError
    from csl_jax.train import NonFiniteLossError, enable_compilation_cache

    # eval and predict too: exact whole-image evaluation compiles one program per image size (COCO: ~100)
    enable_compilation_cache(config.compilation_cache_dir)
    try:
        data.ensure_prepared(config.data)  # the synthetic set (in data.root): generated by process 0, read by all
        if mode == "train":
            claim_workdir(config, workdir)
        records = workdir if mode == "train" else run_info.eval_records_folder(
            workdir, mode, predict_output(workdir) if mode == "predict" else None)
        had_runs = records is not None and os.path.isdir(os.path.join(records, "runs"))
        record = run_info.prepare(config, records, mode) if records else None
        try:
            run(mode, config, workdir, save=records == workdir)
        except BaseException:
            if record and mode != "train":  # a failed eval/predict leaves no record behind
                run_info.withdraw(record, remove_folder=not had_runs)
            raise
    except KeyboardInterrupt:  # a second Ctrl-C (the first one saves and stops, as SIGTERM)
        if os.environ.get("CSL_JAX_TRACEBACK"):
            raise
        raise SystemExit("error: interrupted by a second Ctrl-C; nothing was saved after the last checkpoint "
                         f"in {workdir}/checkpoints") from None
    except (CheckpointDamagedError, CheckpointWriteError, NonFiniteLossError, ValueError,
            FileNotFoundError) as error:
        # Bad input found while running (a split name, a missing or corrupt file, undecodable images to
        # predict, a damaged checkpoint): the message names the file or key and what was expected.
        # CSL_JAX_TRACEBACK=1 shows the traceback.
        if os.environ.get("CSL_JAX_TRACEBACK"):
            raise
        raise SystemExit(f"error: {error}") from None  # exit 1


def claim_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Train mode, before anything is written into `workdir`: the batches split over the devices into
    whole loss groups, the workdir lock (process 0), a resume keeps the run's recipe. A failed check is
    a usage error (exit 2)."""
    import jax

    from csl_jax import train

    try:
        train.check_devices(config)
    except ValueError as error:
        usage_error(str(error))
    if jax.process_index() == 0:
        try:
            lock = workdir_lib.WorkdirLock.acquire(workdir)
        except workdir_lib.WorkdirLockedError as error:
            usage_error(str(error))
        atexit.register(lock.release)
    try:
        workdir_lib.check_resume(workdir, config)
    except ValueError as error:
        usage_error(str(error))


def run(mode: str, config: ml_collections.ConfigDict, workdir: str, save: bool) -> None:
    """Trains, evaluates or predicts (`mode`) with a checked config in `workdir`; eval saves its results
    there when `save`."""
    import jax

    from csl_jax.models import layers, registry

    # read while the steps are traced; a run saved before the kernels existed keeps the plain formulations
    with layers.kernels(config.model.get("kernels", registry.LATER_FIELDS["kernels"])):
        if mode == "train":
            from csl_jax import run_info, train

            results = train.train_and_evaluate(config, workdir)
            if jax.process_index() == 0:
                print(run_info.summary(results, workdir))
            return
        from csl_jax.evaluation import modes

        if mode == "eval":
            modes.evaluate_checkpoint(config, workdir, FLAGS.checkpoint, FLAGS.evaluation, FLAGS.split, save)
        else:
            modes.predict(config, workdir, FLAGS.checkpoint, FLAGS.input, predict_output(workdir), FLAGS.evaluation)


def checked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` after `config_checks.check` and the method's check; a bad setting is a usage error."""
    from csl_jax import config_checks, methods

    try:
        config_checks.check(config)
        methods.check_config(config)
    except ValueError as error:
        usage_error(str(error))
    return config


def evaluation_config(workdir: str, mode: str) -> ml_collections.ConfigDict:
    """eval/predict: the run's config.json with the evaluation overrides, or --config when there is none."""
    try:
        saved = workdir_lib.saved_config(workdir)
        if saved is None:
            return FLAGS.config
        overrides = config_flags.get_override_values(FLAGS["config"]) if FLAGS.config is not None else {}
        config = workdir_lib.evaluation_config(saved, overrides, workdir, mode)
    except ValueError as error:
        usage_error(str(error))
    logging.info("--mode=%s uses the run's config %s.", mode, os.path.join(workdir, workdir_lib.CONFIG_FILE))
    return config


def predict_output(workdir: str) -> str:
    """predict's output folder: --output, default WORKDIR/predictions."""
    return FLAGS.output or os.path.join(workdir, "predictions")


def check_eval_flags(workdir: str, config: ml_collections.ConfigDict) -> None:
    """--checkpoint, --split, --evaluation and --input name things that exist and parse; predict's
    output folder can be written."""
    from csl_jax import config_checks

    which = FLAGS.checkpoint
    kinds = {"best": ("best", "best model"), "latest": ("checkpoints", "train-state checkpoint")}
    if which in kinds:
        folder, what = kinds[which]
        if not workdir_lib.checkpoint_steps(workdir, folder):
            usage_error(f"--checkpoint={which}: no {what} in {os.path.join(workdir, folder)}; train there first, "
                        f"or give --checkpoint={'latest' if which == 'best' else 'best'} or a model file")
    elif not os.path.isfile(which):
        usage_error(f"--checkpoint={which}: no such file; valid: 'best', 'latest' or a converted/PyTorch model file")
    if FLAGS.split and FLAGS.split not in config_checks.EVAL_SPLITS:
        usage_error(f"--split={FLAGS.split}: valid: {', '.join(config_checks.EVAL_SPLITS)}")
    if FLAGS.evaluation:
        try:
            config_checks.check_evaluation(FLAGS.evaluation, config.eval.protocol, f"--evaluation={FLAGS.evaluation}")
        except ValueError as error:
            usage_error(str(error))
    if FLAGS.mode != "predict":
        return
    if not os.path.isdir(FLAGS.input):
        usage_error(f"--input={FLAGS.input}: no such folder; give the folder of images to segment")
    output = predict_output(workdir)
    problem = workdir_lib.folder_problem(output)
    if problem:
        usage_error(f"--output={output}{'' if FLAGS.output else ' (the default)'}: {problem}; give --output=FOLDER, "
                    "a folder to write the predictions into")


def _config_spec(argv: list[str]) -> str | None:
    """The value of --config in `argv` ('path.py[:arg]'), or None."""
    for i, arg in enumerate(argv[1:], 1):
        name, equals, value = arg.partition("=")
        if name in ("--config", "-config"):
            return value if equals else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def _unknown_override(argv: list[str], spec: str) -> str | None:
    """A message naming the first `--config.a.b=v` override whose key the config lacks, or None."""
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


def _unknown_flag_message(error: flags.UnrecognizedFlagError) -> str:
    """'unknown flag --wrokdir (did you mean --workdir?); main.py's flags: ...'."""
    name = error.flagname
    if name.startswith("config.") and FLAGS["config"].value is None:
        return f"--{name}: a config override needs --config=FILE before it"
    close = difflib.get_close_matches(name, list(FLAGS), n=1)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    own = ", ".join(f"--{flag.name}" for flag in FLAGS.get_flags_for_module(sys.argv[0]))
    return f"unknown flag --{name}{hint}; main.py's flags: {own} (--helpfull lists all)"


def _flag_error_message(error: flags.Error, spec: str | None) -> str:
    """absl's (possibly multi-line) message as one line, with the expected type of a config override."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "Error whilst parsing config file" in str(error):  # the config's get_config raised: its last line says why
        return f"--config={spec}: get_config raised {lines[-1]}"
    message = "; ".join(lines).removeprefix("flag ")
    match = re.match(r"--config\.([\w.]+)=", message)
    if match and FLAGS["config"].value is not None:
        node = FLAGS["config"].value
        for key in match.group(1).split("."):
            node = node.get(key) if isinstance(node, ml_collections.ConfigDict) else None
        if node is not None:
            message += f" (config.{match.group(1)}: type {type(node).__name__}, e.g. {node!r})"
    return message


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing; every command-line mistake ends in one line on stderr and exit code 2."""
    spec = _config_spec(argv)
    if spec is not None and not os.path.isfile(spec.partition(":")[0]):
        usage_error(f"--config={spec}: no such file {spec.partition(':')[0]!r}; a config is a Python file "
                    "with get_config(), e.g. --config=configs/demo.py")
    try:
        rest = FLAGS(argv)
    except flags.UnrecognizedFlagError as error:
        usage_error(_unknown_flag_message(error))
    except flags.Error as error:
        usage_error(_flag_error_message(error, spec))
    except (AttributeError, KeyError) as error:  # config_flags: an override of a key the config lacks
        try:
            message = _unknown_override(argv, spec) if spec else None
        except Exception as config_error:  # the config file itself failed: name it, one line
            message = f"--config={spec}: get_config raised {type(config_error).__name__}: {config_error}"
        usage_error(message or f"{type(error).__name__}: {error}")
    if len(rest) > 1:
        usage_error(f"unexpected arguments {rest[1:]}; flags take the form --name=value")
    mode, workdir = FLAGS.mode, FLAGS.workdir
    if FLAGS.config is None and mode in ("train", "config"):
        usage_error("--config=FILE is required, e.g. python main.py --config=configs/demo.py --workdir=runs/demo "
                    "(--helpshort lists the flags)")
    if mode != "config" and not workdir:
        usage_error(f"--mode={mode} needs --workdir=DIR, the run's directory, e.g. --workdir=runs/demo")
    if mode != "config":
        problem = workdir_lib.folder_problem(workdir, writing=mode == "train")  # eval/predict write only where they can
        if problem:
            usage_error(f"--workdir={workdir}: {problem}")
    if FLAGS.config is None and not os.path.isfile(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
        usage_error(f"--mode={mode}: {workdir} has no config.json, so give the run's --config=FILE")
    if mode == "predict" and not FLAGS.input:
        usage_error("--mode=predict needs --input=FOLDER, the images to segment")
    return rest


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
