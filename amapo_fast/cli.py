"""What the command-line entry points share: user errors as one line, and checks of the output folder.

A `UserError` is a mistake the user can fix (a path, a flag, a value, a column, an empty file): the command
prints `error: <message>` once, from rank 0, and exits with status 2, without a traceback. Any other
exception is a bug or an environment failure and keeps its traceback. `--debug` on the command line, or
AMAPO_DEBUG=1 in the environment, shows the traceback of user errors too.
"""
import argparse
import contextlib
import functools
import os
import re
import sys
import tempfile
import threading

DEBUG_FLAG = "--debug"
DEBUG_ENV = "AMAPO_DEBUG"
USER_ERROR_EXIT = 2


class UserError(ValueError):
    """An error the user caused and can fix; its message is the whole story, one line. A ValueError, so that
    library callers that catch bad values keep catching it."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes (unknown flag, bad value) are `UserError`s: one line, printed by rank 0 only.

    Abbreviated flags are refused (`--learning_rat` is a mistake, not `--learning_rate`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        # argparse names a flag by all its spellings ("--max-length/--max_length"): the first one is enough.
        message = re.sub(r"(--[\w-]+)(?:/--[\w-]+)+", r"\1", message)
        raise UserError(f"{message} (see {self.prog} --help)")


def both_spellings(*flags: str) -> list[str]:
    """Each flag as written and with '_' and '-' swapped (`--max_length`, `--max-length`), so that both command
    lines take either spelling; the first flag names the value."""
    spelled = []
    for flag in flags:
        body = flag[2:]
        for variant in (body, body.replace("-", "_"), body.replace("_", "-")):
            if f"--{variant}" not in spelled:
                spelled.append(f"--{variant}")
    return spelled


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default (unless it has none) and keeps the description's line breaks."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def progress_bars() -> bool:
    """Whether to draw progress bars: on a terminal only; in a log file every redraw would be a line of its own."""
    return sys.stderr.isatty()


def quiet_library_progress():
    """Turn off the libraries' own bars ('Generating train split', 'Loading weights', 'Writing model shards'):
    the commands draw one bar per long phase themselves (tokenizing, training, evaluating)."""
    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging

    huggingface_hub.utils.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        import datasets
    except ImportError:  # an image without datasets still trains on tensors and evaluates nothing
        return
    datasets.disable_progress_bars()


@contextlib.contextmanager
def datasets_progress():
    """datasets' bar for the block (a long map such as tokenization), on a terminal only."""
    import datasets

    if not progress_bars():
        yield
        return
    datasets.enable_progress_bars()
    try:
        yield
    finally:
        datasets.disable_progress_bars()


def add_debug_flag(parser: argparse.ArgumentParser):
    parser.add_argument(
        DEBUG_FLAG, action="store_true", help=f"show the traceback of user errors too (or set {DEBUG_ENV}=1)"
    )


def debugging(argv=None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _rank() -> int:
    """The global rank from torchrun's environment (valid before the process group exists), 0 without it."""
    return int(os.environ.get("RANK", 0))


def exits_cleanly_on_user_errors(main):
    """Wrap a command's `main(argv=None)`: a `UserError` prints one line on rank 0 and exits with status 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as error:
            if debugging(argv):
                raise
            if _rank() == 0:
                from tqdm.auto import tqdm

                # tqdm.write: on a line of its own even when a progress bar (training, evaluating) was cut short.
                tqdm.write(f"error: {error}", file=sys.stderr)
            raise SystemExit(USER_ERROR_EXIT) from None

    return wrapper


@contextlib.contextmanager
def user_errors(*types, prefix: str = ""):
    """Exceptions of `types` raised inside the block (a library's reply to bad user input) become `UserError`s
    carrying the first line of their message; the original stays chained for --debug."""
    try:
        yield
    except UserError:
        raise
    except types as error:
        lines = str(error).strip().splitlines()
        raise UserError(prefix + (lines[0] if lines else type(error).__name__)) from error


LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".yaml", ".yml")


def require_existing_if_local(name: str, flag: str):
    """A name that can only be a local path must exist; otherwise the hub is asked for it and answers with a
    confusing message about repository ids. Local-only: it starts with '.', '/' or '~', ends like a data file,
    has more than one '/' (a hub id is `owner/name`), or starts with a folder that exists here."""
    if os.path.exists(name):
        return
    first = name.split("/", 1)[0]
    if (
        name.startswith((".", "/", "~")) or name.lower().endswith(LOCAL_SUFFIXES) or name.count("/") > 1
        or ("/" in name and os.path.isdir(first))
    ):
        raise UserError(f"{flag} {name}: no such file or folder")
    require_hub_reachable(name, flag)


_HUB_REACHABLE = {}  # endpoint -> None when reachable, else why not (asked once per process)


def require_hub_reachable(name: str, flag: str, timeout: float = 3.0):
    """A hub name needs the hub: without a network the libraries retry for half a minute before failing, so
    the hub's host is asked once, briefly. HF_HUB_OFFLINE=1 (the local cache only) skips the question."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    import socket
    import urllib.parse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _HUB_REACHABLE:
        url = urllib.parse.urlsplit(endpoint)
        address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
        answer = []

        def connect():  # in a thread: a name lookup that gets no answer ignores the socket's timeout
            try:
                socket.create_connection(address, timeout).close()
                answer.append(None)
            except OSError as error:
                answer.append(getattr(error, "strerror", None) or str(error) or type(error).__name__)

        thread = threading.Thread(target=connect, daemon=True)
        thread.start()
        thread.join(timeout)
        _HUB_REACHABLE[endpoint] = answer[0] if answer else f"no answer within {timeout:g} s"
    if _HUB_REACHABLE[endpoint] is not None:
        raise UserError(
            f"{flag} {name}: not a local file or folder, and the hub ({endpoint}) cannot be reached "
            f"({_HUB_REACHABLE[endpoint]}): pass a local path, or set HF_HUB_OFFLINE=1 to load it from the local "
            "Hugging Face cache"
        )


EXPORT_HINT = "export {what} to a model folder with python -m amapo_fast.export {checkpoint} FOLDER"


def check_model_folder(path: str, flag: str):
    """A local folder given as a model must be one that from_pretrained loads: config.json and complete weights.

    A training checkpoint, a training run's output folder, a folder without config.json and a truncated
    safetensors file are each refused in one line that says what the folder is and what to pass instead.
    Names that are not local folders (hub names, 'toy') pass untouched."""
    if not os.path.isdir(path):
        if os.path.isfile(path):
            raise UserError(f"{flag} {path}: a file; expected a model folder (config.json and the weights)")
        return
    names = set(os.listdir(path))
    if "config.json" in names:
        _check_weights(path, names, flag)
        return
    if "adapter_config.json" in names:  # a peft adapter folder: its config names the base model
        return
    if names & {"trainer_state.json", "dcp", "manifest.json"} or re.fullmatch(r"checkpoint-\d+(\.tmp)?", os.path.basename(os.path.normpath(path))):
        raise UserError(
            f"{flag} {path}: a training checkpoint (sharded training state), not a model folder: pass the run's "
            f"final/ folder, or {EXPORT_HINT.format(what='this checkpoint', checkpoint=path)}"
        )
    if any(os.path.isfile(os.path.join(path, "final", name)) for name in ("config.json", "adapter_config.json")):
        raise UserError(f"{flag} {path}: a training run's output folder; its trained model is {os.path.join(path, 'final')}")
    if "log.jsonl" in names or any(re.fullmatch(r"checkpoint-\d+", name) for name in names):
        raise UserError(
            f"{flag} {path}: a training run's output folder without a final/ model (the run has not finished, or "
            f"ran with --save_final false): "
            f"{EXPORT_HINT.format(what='one of its checkpoints', checkpoint=os.path.join(path, 'checkpoint-N'))}"
        )
    raise UserError(f"{flag} {path}: no config.json, so not a model folder (from_pretrained needs config.json and the weights)")


def _check_weights(path: str, names: set, flag: str):
    """Every safetensors file of the folder (and every shard its index lists) is present and complete."""
    files = sorted(name for name in names if name.endswith(".safetensors"))
    index = "model.safetensors.index.json"
    if index in names:
        import json

        with open(os.path.join(path, index), encoding="utf-8") as handle:
            listed = sorted(set(json.load(handle).get("weight_map", {}).values()))
        missing = [name for name in listed if name not in names]
        if missing:
            raise UserError(f"{flag} {path}: {index} lists {missing[0]}, which is missing: the folder is incomplete")
    for name in files:
        problem = _safetensors_problem(os.path.join(path, name))
        if problem:
            raise UserError(f"{flag} {path}: {name} {problem}: the folder was not written completely; write it again")


def _safetensors_problem(file_path: str) -> str | None:
    """Why a .safetensors file is damaged (cut short, bad header), or None: its header gives its exact size."""
    import json
    import struct

    size = os.path.getsize(file_path)
    with open(file_path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"is cut short ({size} bytes)"
        (header_size,) = struct.unpack("<Q", head)
        if 8 + header_size > size:
            return f"is cut short ({size} bytes, its header alone needs {8 + header_size})"
        try:
            header = json.loads(handle.read(header_size))
        except ValueError:
            return "has an unreadable header"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_size + max(ends, default=0)
    if size < expected:
        return f"is cut short ({size} of {expected} bytes)"
    return None


def check_output_dir(path: str, flag: str, *, must_be_empty: bool = False, empty_hint: str = "", ignore=()):
    """Refuse an output folder that cannot be used, before anything expensive runs.

    Refused: a path that is a file, a path under a file, a folder (or its nearest existing parent) that this
    process cannot write, and, with `must_be_empty`, a folder that already holds files other than `ignore`.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: exists and is a file, not a folder")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path}: cannot create it, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable")
    try:  # access() says yes to root everywhere, and to kernel file systems (/proc, /sys) that refuse folders
        os.rmdir(tempfile.mkdtemp(prefix=".amapo-probe-", dir=existing))
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot create a folder in {existing} ({error.strerror or error})") from error
    if must_be_empty and existing == path and set(os.listdir(path)) - set(ignore):
        raise UserError(f"{flag} {path}: holds files of an earlier run{empty_hint}")
