"""Small helpers every stage shares: one-line errors, atomic writes, JSON, checksums, logs, progress.

Not a stage of its own; every script and module imports it. Nothing here imports TensorFlow.
"""
import argparse
import contextlib
import logging
import hashlib
import json
import os
import sys
from pathlib import Path


class PipelineError(Exception):
    """A user-facing error: the message is one line saying what went wrong and where."""


def run_cli(main_fn, argv=None, tensorflow=True):
    """Run a script's main(); turn user errors into one `error: ...` line and a non-zero exit.

    Exit codes: what main returns (0 = success), 1 for a PipelineError or a missing file,
    130 for Ctrl-C (the shell's convention for SIGINT). Programming errors still show their
    traceback, because hiding those would hide bugs.
    """
    quiet_logs(tensorflow)
    try:
        return main_fn(argv)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"error: file not found ({exc.filename or exc})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished work was kept; run the same command again to resume",
              file=sys.stderr)
        return 130


@contextlib.contextmanager
def atomic_write(path, mode="w", **open_kwargs):
    """Open `path` for writing so that readers only ever see the old or the complete new file.

    Writes go to a temporary file beside it (same filesystem, so the rename is atomic), which
    replaces `path` only when the block finishes without an exception; on any error or Ctrl-C
    the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
        open_kwargs.setdefault("newline", "\n")
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path, obj):
    """Write `obj` as indented, key-sorted JSON, atomically (diff-friendly, human-readable)."""
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")


def read_json(path):
    """Read a JSON file; a missing or malformed file is a one-line PipelineError naming it."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"missing file {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc})") from None


def sha256_file(path, chunk_bytes=1 << 20):
    """Hex SHA-256 of a file, read in 1 MiB chunks so large files do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help that states each default once: "(default: X)" is added unless the help text
    already says "(default", and left out for flags and for None (which only means "not given").
    The description (the script's docstring) keeps its line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("(default" in text.lower() or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def save_settings(path, args, **extra):
    """Save a run's final settings (argparse values plus anything derived) beside its outputs."""
    settings = {key: (str(value) if isinstance(value, Path) else value)
                for key, value in vars(args).items()}
    settings.update(extra)
    write_json(path, settings)


def quiet_logs(tensorflow=True):
    """Silence TensorFlow's start-up chatter (CUDA probing on a CPU machine, oneDNN and CPU
    feature notices) so it does not interleave with the one-line errors. Called once, by run_cli.

    TF 2.21 prints those lines through C++ absl logging *before* absl is initialised, where
    TF_CPP_MIN_LOG_LEVEL has no effect; the only switch is the stderr file descriptor itself, so
    it is pointed at /dev/null for the duration of `import tensorflow` (and restored at once:
    later errors still reach the terminal). tensorflow=False skips the import, for stages that
    never use it (prepare_text, the downloader).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.getLogger("absl").setLevel(logging.ERROR)
    if not tensorflow or "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                import tensorflow
                # Device discovery prints "failed call to cuInit" on a machine without a GPU at
                # the first operation; run it here, inside the silenced window.
                tensorflow.config.list_physical_devices()
            except ImportError:
                pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def on_terminal(stream=None):
    """True when progress bars can redraw in place: `stream` (stderr) is an interactive terminal."""
    stream = stream or sys.stderr
    return hasattr(stream, "isatty") and stream.isatty()


def progress(iterable=None, **kwargs):
    """A tqdm bar on a terminal; in a log file or CI output, no bar at all (a redrawn bar
    writes ANSI codes and a line every 0.05 s there). Stages print their own summary lines."""
    from tqdm import tqdm
    kwargs.setdefault("disable", not on_terminal())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def keras_verbose():
    """Keras fit/predict verbosity: 1 (a live bar) on a terminal, 2 (one line per epoch) otherwise."""
    return 1 if on_terminal(sys.stdout) else 2


def require(module, extra, purpose):
    """Import and return `module`; where it is not installed, a one-line PipelineError that says
    which extra of this project brings it (e.g. require("av", "video", "caption_video.py"))."""
    import importlib
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
            raise       # installed, but something it imports is missing: the real error
        raise PipelineError(f"{purpose} needs the '{module}' package: pip install "
                            f"'flickr8k-captioning[{extra}]' (or pip install -r requirements.txt)") from None


def check_installed(purpose, extra, *modules):
    """At a script's top, before the imports that need an optional extra: exit 1 with
    require()'s one line (no traceback) when one of `modules` is not installed."""
    for module in modules:
        try:
            require(module, extra, purpose)
        except PipelineError as exc:
            sys.exit(f"error: {exc}")
