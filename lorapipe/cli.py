"""What every scripts/ entry point shares: --rule/--log flags, logging, one-line errors."""

import argparse
import logging
import sys

from lorapipe.errors import InputError, StepError  # noqa: F401 - scripts raise cli.InputError
from lorapipe.provenance import Run

log = logging.getLogger("lorapipe")


def parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--rule", default="manual", help="the Snakemake rule running this step (provenance)")
    p.add_argument("--log", default=None, help="also write the step's log to this file")
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
    log.info("%s: %s", args.rule, " ".join(f"{k}={v}" for k, v in params.items()))
    return Run(args.rule, params, **run_kwargs)


def main_guard(main):
    """Run a script's main(); a bad-input error (InputError, StepError, or a file named on the command
    line that is not there) becomes one clear line on stderr and exit status 1. Any other exception is
    a bug and shows its traceback."""
    try:
        main()
    except (StepError, FileNotFoundError) as e:
        log.error("%s", e)  # to stderr, and to the log file once setup_logging ran
        sys.exit(1)
