"""run_pipeline.py: stage order, skipping of up-to-date stages, --force, missing data.

The end-to-end test runs stages 3-6 for real on the bundled sample (data/sample/), with
seeded random features for its 320 images given through --features, so no VGG16 pass is
needed here (.ci/run does the full run with VGG16 as well).
"""
import pickle
import re

import numpy as np
import pytest

import run_pipeline
from captioning.utils import PipelineError


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


def test_sample_run_goes_from_captions_to_a_bleu_table(sample_run, capsys):
    out, args = sample_run
    assert run_pipeline.main(args) == 0
    text = capsys.readouterr().out
    ran = [(n, name) for n, name, rest in stage_lines(text) if "skipped" not in rest]
    assert ran == [("3", "text"), ("4", "train"), ("5", "caption"), ("6", "bleu")]
    assert (out / "data/sample/meta.json").is_file()
    assert (out / "models/sample/model.keras").is_file()
    assert (out / "results/sample/results.json").is_file()
    assert (out / "results/sample/gallery.html").is_file()
    assert re.search(r"^standard(\s+\d\.\d{3}){4}$", text, flags=re.M)
    assert re.search(r"^tutorial(\s+\d\.\d{3}){4}$", text, flags=re.M)


def test_second_run_skips_every_finished_stage_and_force_reruns_from_a_stage(sample_run, capsys):
    out, args = sample_run
    if not (out / "results/sample/results.json").exists():
        pytest.skip("needs the first run")
    model_mtime = (out / "models/sample/model.keras").stat().st_mtime_ns
    assert run_pipeline.main(args) == 0
    lines = stage_lines(capsys.readouterr().out)
    skipped = [name for _, name, rest in lines if rest.startswith("up to date, skipped")]
    assert skipped == ["text", "train", "bleu"]
    assert (out / "models/sample/model.keras").stat().st_mtime_ns == model_mtime

    assert run_pipeline.main(args + ["--force", "bleu"]) == 0
    lines = stage_lines(capsys.readouterr().out)
    skipped = [name for _, name, rest in lines if rest.startswith("up to date, skipped")]
    assert skipped == ["text", "train"]  # bleu reran; earlier stages kept


def test_changed_settings_make_a_stage_run_again(tmp_path):
    calls = []

    def fake_stage(argv):
        calls.append(argv)
        (tmp_path / "out.txt").write_text("x")
        return 0

    fake_stage.__module__ = "fake"
    source = tmp_path / "input.txt"
    source.write_text("v1")
    common = dict(inputs=[source], outputs=[tmp_path / "out.txt"], state_dir=tmp_path / "state",
                  forced=False)
    run_pipeline.run_stage(1, "fake", fake_stage, ["--a", 1], **common)
    run_pipeline.run_stage(1, "fake", fake_stage, ["--a", 1], **common)  # up to date
    assert len(calls) == 1
    run_pipeline.run_stage(1, "fake", fake_stage, ["--a", 2], **common)  # other setting
    assert len(calls) == 2
    source.write_text("v2, longer")                                       # changed input
    run_pipeline.run_stage(1, "fake", fake_stage, ["--a", 2], **common)
    assert len(calls) == 3


def test_failed_stage_is_not_recorded_and_stops_the_run(tmp_path):
    def failing(argv):
        raise PipelineError("bad caption line (file.txt:3)")

    failing.__module__ = "fake"
    with pytest.raises(PipelineError, match="stage fake .* failed with exit code 1"):
        run_pipeline.run_stage(1, "fake", failing, [], [], [], tmp_path / "state", False)
    assert not (tmp_path / "state" / "fake.json").exists()


def test_half_present_data_dir_lists_what_is_missing(tmp_path, capsys):
    (tmp_path / "Flickr8k_text").mkdir()
    (tmp_path / "Flickr8k_text" / "Flickr8k.token.txt").write_text("x")
    code = run_pipeline.run_cli(run_pipeline.main, ["--data-dir", str(tmp_path),
                                                    "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err
    assert "Flickr_8k.trainImages.txt" in err and "Flicker8k_Dataset/*.jpg" in err


def test_force_really_reruns_extraction_and_training(tmp_path, capsys):
    """--force passes --overwrite to a forced extraction and clears a forced training run."""
    calls = []
    run_dir = tmp_path / "models" / "x"

    def stage(argv):
        calls.append(argv)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "model.keras").write_text(str(len(calls)))
        return 0

    stage.__module__ = "fake"
    common = dict(inputs=[], outputs=[run_dir / "model.keras"], state_dir=tmp_path / "state")
    run_pipeline.run_stage(4, "train", stage, ["--a"], forced=False, force_args=["--overwrite"],
                           force_clear=[run_dir], **common)
    (run_dir / "last.keras").write_text("old checkpoint")
    run_pipeline.run_stage(4, "train", stage, ["--a"], forced=True, force_args=["--overwrite"],
                           force_clear=[run_dir], **common)
    assert calls == [["--a"], ["--a", "--overwrite"]]
    assert not (run_dir / "last.keras").exists()           # the old checkpoint was cleared
    assert (run_dir / "model.keras").read_text() == "2"
    run_pipeline.run_stage(4, "train", stage, ["--a"], forced=False, **common)
    assert len(calls) == 2                                   # recorded without --overwrite
    assert "up to date" in capsys.readouterr().out


def test_ctrl_c_in_a_stage_exits_130_with_one_line(tmp_path, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    interrupted.__module__ = "fake"
    with pytest.raises(SystemExit) as stop:
        run_pipeline.run_stage(1, "fake", interrupted, [], [], [], tmp_path / "state", False)
    assert stop.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted:")
    assert "failed with exit code" not in " ".join(err)
