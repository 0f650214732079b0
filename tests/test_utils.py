"""captioning.utils: quiet start-up logs, --help defaults stated once, no bars in log files."""
import argparse
import subprocess
import sys

import pytest

from captioning.utils import HelpFormatter, keras_verbose, on_terminal, progress


@pytest.mark.slow
def test_importing_tensorflow_through_run_cli_prints_nothing_on_stderr():
    script = ("import sys\n"
              "from captioning.utils import run_cli\n"
              "def main(argv):\n"
              "    import keras\n"
              "    keras.ops.ones((2,)).numpy()\n"          # first op: device discovery (cuInit)
              "    print('ok')\n"
              "    return 0\n"
              "sys.exit(run_cli(main))\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}   # no TF_CPP_MIN_LOG_LEVEL from the caller
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok"
    assert done.stderr == "", done.stderr          # e.g. no "Could not find cuda drivers" line


def test_help_states_each_default_once():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--epochs", type=int, default=20, help="upper bound")
    parser.add_argument("--seed", type=int, default=0, help="seed")
    parser.add_argument("--beam", type=int, default=3, help="beam width (default 3)")
    parser.add_argument("--features", default=None, help="features file")
    parser.add_argument("--force", action="store_true", help="start again")
    text = parser.format_help()
    assert "upper bound (default: 20)" in text
    assert "seed (default: 0)" in text                    # 0 is a real default, not "unset"
    assert "(default 3)" in text and "(default: 3)" not in text
    assert "default: None" not in text and "default: False" not in text


def test_no_progress_bar_off_a_terminal(capsys):
    assert not on_terminal()            # pytest captures stderr: like a log file or CI
    assert keras_verbose() == 2         # Keras: one line per epoch
    bar = progress(range(3), desc="x")
    assert list(bar) == [0, 1, 2] and bar.disable
    assert capsys.readouterr().err == ""
