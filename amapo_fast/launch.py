"""`amapo-train [launcher options] [trainer options]`: torchrun for the trainer, with its one-line errors.

    amapo-train --nproc_per_node 8 --config configs/llama-3-8b-instruct.yaml

Launcher options are torchrun's (`--nproc_per_node`, `--nnodes`, `--master_port`, `--rdzv_endpoint`, ...);
every other argument goes to the trainer (`amapo-train --help` lists them). The settings and the output
folder are checked here before any worker starts, so a mistake there is one `error:` line and exit status 2
with no worker started. The workers then run under torch's elastic agent (what torchrun runs); when one
fails, the command ends with that worker's exit status (2 for a user error, whose one line the worker
printed) instead of the launcher's failure report.
"""
import logging
import os
import sys

from .cli import exits_cleanly_on_user_errors

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
# torchrun options that choose what to run: the trainer is what this command runs.
NOT_PASSED = {"-h", "--help", "-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path"}


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, the trainer's arguments): an option torchrun knows goes to it with its value."""
    from torch.distributed.run import get_args_parser

    actions = {option: action for action in get_args_parser()._actions for option in action.option_strings}
    launcher, trainer = [], []
    position = 0
    while position < len(argv):
        token = argv[position]
        name = token.split("=", 1)[0]
        action = actions.get(name) if name not in NOT_PASSED else None
        position += 1
        if action is None:
            trainer.append(token)
            continue
        launcher.append(token)
        if "=" not in token and action.nargs != 0 and position < len(argv):
            launcher.append(argv[position])
            position += 1
    return launcher, trainer


def _exit_status(error) -> int:
    """The first failed worker's exit status; a worker killed by signal N gives 128 + N, as a shell does."""
    _, failure = error.get_first_failure()
    code = failure.exitcode
    return code if code > 0 else 128 - code if code < 0 else 1


def main(argv: list[str] | None = None):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from .train import check_settings

    argv = sys.argv[1:] if argv is None else list(argv)
    launcher, trainer = split_argv(argv)
    exits_cleanly_on_user_errors(check_settings)(trainer)
    args = get_args_parser().parse_args(launcher + [TRAIN_SCRIPT] + trainer)
    # The agent's own account of a failed worker (a warning per worker, the failure table) would follow the
    # worker's one line; the exit status carries the outcome.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as error:
        raise SystemExit(_exit_status(error)) from None


if __name__ == "__main__":
    main()
