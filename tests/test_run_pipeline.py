"""run_pipeline.py (captioning/apps/pipeline.py): stage order, skipping of up-to-date stages,
--force, missing data, a stage's exit code and stderr carried through.

The end-to-end test runs stages 3-6 for real on the bundled sample (data/sample/), with
seeded random features for its 320 images given through --features, so no VGG16 pass is
needed here (.ci/run does the full run with VGG16 as well). The other tests run small
stand-in scripts, as processes, the way the pipeline runs the real ones.
"""
import json
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import run_pipeline
from captioning.apps.pipeline import run_stage
from captioning.utils import PipelineError, run_cli


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    ids = [p.stem for p in (run_pipeline.SAMPLE_DIR / "Flicker8k_Dataset").glob("*.jpg")]
    rng = np.random.default_rng(0)
    features = out / "features.pkl"
    with open(features, "wb") as handle:
        pickle.dump({i: rng.normal(size=32).astype(np.float32) for i in sorted(ids)}, handle)
    args = ["--sample", "--features", str(features), "--out-dir", str(out), "--epochs", "1",
            "--beam", "2"]
    return out, args


def stage_lines(text):
    return re.findall(r"^\[(\d)/6\] (\w+): (.*)$", text, flags=re.M)


def fake_stage(tmp_path, body):
    """A stand-in stage script whose main(argv) runs `body` under run_cli, like the real ones;
    every run appends its argv to calls.jsonl beside it. -> (script, function reading the calls)."""
    script, calls = tmp_path / "fake.py", tmp_path / "calls.jsonl"
    script.write_text(textwrap.dedent("""\
        import json, sys
        from pathlib import Path
        from captioning.utils import PipelineError, run_cli

        def main(argv):
            with open({calls!r}, "a") as handle:
                handle.write(json.dumps(argv) + "\\n")
        {body}
            return 0

        sys.exit(run_cli(main, sys.argv[1:], tensorflow=False))
        """).format(calls=str(calls), body=textwrap.indent(textwrap.dedent(body), " " * 4)))
    return script, lambda: [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


@pytest.fixture(scope="module")
def first_run(sample_run):
    """The sample pipeline run once, as a user runs it: (out, args, CompletedProcess)."""
    out, args = sample_run
    done = subprocess.run([sys.executable, str(Path(run_pipeline.__file__)), *args],
                          capture_output=True, text=True, timeout=1200)
    return out, args, done


@pytest.mark.slow
def test_sample_run_goes_from_captions_to_a_bleu_table(first_run):
    out, args, done = first_run
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    ran = [(n, name) for n, name, rest in stage_lines(text) if "skipped" not in rest]
    assert ran == [("3", "text"), ("4", "train"), ("5", "caption"), ("6", "bleu")]
    assert (out / "data/sample/meta.json").is_file()
    assert (out / "models/sample/model.keras").is_file()
    assert (out / "results/sample/results.json").is_file()
    assert (out / "results/sample/gallery.html").is_file()
    assert re.search(r"^standard(\s+\d\.\d{3}){4}$", text, flags=re.M)
    assert re.search(r"^tutorial(\s+\d\.\d{3}){4}$", text, flags=re.M)
    # the stages' own output comes through: generate_caption.py's `id<TAB>caption` lines
    assert len(re.findall(r"^\d+_\w+\t", text, flags=re.M)) == run_pipeline.CAPTION_EXAMPLES


@pytest.mark.slow
def test_second_run_skips_every_finished_stage_and_force_reruns_from_a_stage(first_run, capfd):
    out, args, done = first_run
    assert done.returncode == 0, done.stderr[-2000:]
    model_mtime = (out / "models/sample/model.keras").stat().st_mtime_ns
    assert run_pipeline.main(args) == 0
    lines = stage_lines(capfd.readouterr().out)
    skipped = [name for _, name, rest in lines if rest.startswith("up to date, skipped")]
    assert skipped == ["text", "train", "bleu"]
    assert (out / "models/sample/model.keras").stat().st_mtime_ns == model_mtime

    assert run_pipeline.main(args + ["--force", "bleu"]) == 0
    lines = stage_lines(capfd.readouterr().out)
    skipped = [name for _, name, rest in lines if rest.startswith("up to date, skipped")]
    assert skipped == ["text", "train"]  # bleu reran; earlier stages kept


def test_changed_settings_make_a_stage_run_again(tmp_path):
    out = tmp_path / "out.txt"
    script, calls = fake_stage(tmp_path, f"Path({str(out)!r}).write_text('x')")
    source = tmp_path / "input.txt"
    source.write_text("v1")
    common = dict(inputs=[source], outputs=[out], state_dir=tmp_path / "state", forced=False)
    run_stage(1, "fake", script, ["--a", 1], **common)
    run_stage(1, "fake", script, ["--a", 1], **common)  # up to date
    assert calls() == [["--a", "1"]]
    run_stage(1, "fake", script, ["--a", 2], **common)  # other setting
    assert len(calls()) == 2
    source.write_text("v2, longer")                      # changed input
    run_stage(1, "fake", script, ["--a", 2], **common)
    assert len(calls()) == 3


def test_failed_stage_is_not_recorded_and_stops_the_run(tmp_path, capfd):
    script, _ = fake_stage(tmp_path, "raise PipelineError('bad caption line (file.txt:3)')")
    with pytest.raises(PipelineError, match=r"stage fake \(fake.py\) failed with exit code 1"):
        run_stage(1, "fake", script, [], [], [], tmp_path / "state", False)
    assert not (tmp_path / "state" / "fake.json").exists()
    assert capfd.readouterr().err.strip() == "error: bad caption line (file.txt:3)"   # the stage's own line


def test_half_present_data_dir_lists_what_is_missing(tmp_path, capsys):
    (tmp_path / "Flickr8k_text").mkdir()
    (tmp_path / "Flickr8k_text" / "Flickr8k.token.txt").write_text("x")
    code = run_cli(run_pipeline.main, ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err
    assert "Flickr_8k.trainImages.txt" in err and "Flicker8k_Dataset/*.jpg" in err


def test_force_really_reruns_extraction_and_training(tmp_path, capsys):
    """--force passes --overwrite to a forced extraction and clears a forced training run."""
    run_dir = tmp_path / "models" / "x"
    script, calls = fake_stage(tmp_path, f"""\
        run_dir = Path({str(run_dir)!r})
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "model.keras").write_text(str(len(open({str(tmp_path / "calls.jsonl")!r}).readlines())))""")
    common = dict(inputs=[], outputs=[run_dir / "model.keras"], state_dir=tmp_path / "state")
    run_stage(4, "train", script, ["--a"], forced=False, force_args=["--overwrite"],
              force_clear=[run_dir], **common)
    (run_dir / "last.keras").write_text("old checkpoint")
    run_stage(4, "train", script, ["--a"], forced=True, force_args=["--overwrite"],
              force_clear=[run_dir], **common)
    assert calls() == [["--a"], ["--a", "--overwrite"]]
    assert not (run_dir / "last.keras").exists()           # the old checkpoint was cleared
    assert (run_dir / "model.keras").read_text() == "2"
    run_stage(4, "train", script, ["--a"], forced=False, **common)
    assert len(calls()) == 2                                 # recorded without --overwrite
    assert "up to date" in capsys.readouterr().out


def test_ctrl_c_in_a_stage_exits_130_with_one_line(tmp_path, capfd):
    script, _ = fake_stage(tmp_path, "raise KeyboardInterrupt")
    with pytest.raises(SystemExit) as stop:
        run_stage(1, "fake", script, [], [], [], tmp_path / "state", False)
    assert stop.value.code == 130
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted:")
    assert "failed with exit code" not in " ".join(err)
