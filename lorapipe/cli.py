"""What every scripts/ entry point shares: --log (which names the step), logging, one-line errors."""

import argparse
import logging
import sys
from pathlib import Path

from lorapipe.errors import InputError, StepError  # noqa: F401 - scripts raise cli.InputError
from lorapipe.model.architecture import ALIBI, ROPE
from lorapipe.provenance import Run

log = logging.getLogger("lorapipe")


def parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--log", default=None, help="also write the step's log to this file; a workflow step's log is "
                                                "<results>/logs/<rule>.log, which names the step in its manifest")
    p.add_argument("--rule", default=None, help="the step's name in its manifest (default: the --log file's name "
                                                "without .log, else manual)")
    return p


def str2bool(text):
    """MindFormers' str2bool: the recipe writes `--use_parallel False`."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected True or False, got {text!r}")


str2bool.__name__ = "True/False"  # argparse names the type in its error message


def add_generation_flags(group):
    """The generation settings as flags, with run_baichuan2_chat.py's names; a flag left out keeps the
    YAML's value (lorapipe.infer.generate.generation_settings)."""
    group.add_argument("--max_new_tokens", type=int, default=None)
    group.add_argument("--do_sample", type=str2bool, default=None)
    group.add_argument("--top_k", type=int, default=None)
    group.add_argument("--top_p", type=float, default=None)
    group.add_argument("--temperature", type=float, default=None)
    group.add_argument("--repetition_penalty", type=float, default=None)


def add_trained_model_flags(p):
    """The flags that name a trained model and the one to compare it with (lorapipe.infer.loader.trained_model)."""
    p.add_argument("--config", required=True, help="rendered MindFormers YAML (the finetune's: model settings)")
    p.add_argument("--load_checkpoint", required=True, help="complete checkpoint (or a folder with rank_0/)")
    p.add_argument("--compare_checkpoint", default=None, help="a second model, e.g. the base")
    p.add_argument("--adapter_config", default=None,
                   help="adapter_config.json of the run that trained LoRA tensors in the checkpoint")


def add_position_embedding_flag(p):
    """--position_embedding: the run's architecture as the workflow decided it (lorapipe.config
    run_position_embedding); a job uses the value it is handed and never derives it again."""
    p.add_argument("--position_embedding", choices=[ROPE, ALIBI], required=True,
                   help="the run's architecture, as the workflow decided it (rope: Baichuan2-7B, alibi: 13B)")


def setup_logging(log_path=None):
    """Log to stderr and, when given, to the rule's log file."""
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="w", encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)


def start(args, params, **run_kwargs):
    """Set up logging for a parsed command line and return the provenance Run of this step."""
    setup_logging(args.log)
    rule = args.rule or (Path(args.log).stem if args.log else "manual")
    log.info("%s: %s", rule, " ".join(f"{k}={v}" for k, v in params.items()))
    return Run(rule, params, **run_kwargs)


def main_guard(main):
    """Run a script's main(); a bad-input error (InputError, StepError, or a file named on the command
    line that is not there) becomes one clear line on stderr and exit status 1. Any other exception is
    a bug and shows its traceback."""
    try:
        main()
    except (StepError, FileNotFoundError) as e:
        log.error("%s", e)  # to stderr, and to the log file once setup_logging ran
        sys.exit(1)
