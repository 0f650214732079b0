"""run_pipeline.py's stage runner: each stage is a top-level script run as its own process,
skipped when what it last finished with is unchanged.

    run_stage(3, "text", REPO / "prepare_text.py", ["--text-dir", text_dir, ...],
              inputs=[text_dir], outputs=[work / "meta.json"], state_dir=work / "pipeline_state",
              forced=False)

A stage runs exactly as a user would type it, `python SCRIPT ARGS...`: its stdout and stderr
are this process's, and its exit code decides (0 = done; 130 = Ctrl-C; anything else = failed).
Writes <state_dir>/<stage>.json once the stage succeeded: {"args": [...], "inputs": {file:
[size, mtime_ns]}}. A stage whose record matches and whose outputs exist is skipped.
Also here: stage 1's choice of encoder (resolve_backbone) and the closing BLEU table (bleu_table).
"""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from captioning.encoders import backbones
from captioning.utils import PipelineError, read_json, write_json

GRACE_S = 10     # after Ctrl-C, how long a stage may take to stop by itself before it is told to


def fingerprint(paths):
    """Size and mtime of each input (a folder: of every file in it), cheap to compare."""
    prints = {}
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat()
            prints[str(file)] = [stat.st_size, stat.st_mtime_ns]
    return prints


def stage_record(args_list, inputs):
    return {"args": [str(a) for a in args_list], "inputs": fingerprint(inputs)}


def is_up_to_date(state_file, record, outputs):
    if not state_file.is_file() or not all(Path(p).exists() for p in outputs):
        return False
    try:
        return read_json(state_file) == record
    except PipelineError:
        return False  # a damaged record just means "run it again"


def run_script(script, args, grace_s=GRACE_S):
    """`python script args...` in a process of its own -> its exit code.

    Ctrl-C at a terminal reaches the stage too (one process group) and it stops by itself,
    keeping its finished work; a SIGINT or SIGTERM sent to this process alone is passed on.
    """
    sys.stdout.flush()        # our lines before the stage's, in a log file too
    sys.stderr.flush()
    process = subprocess.Popen([sys.executable, str(script), *map(str, args)])
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
    try:
        try:
            return process.wait()
        except KeyboardInterrupt:
            try:
                return process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGINT)
                return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_stage(number, name, script, args_list, inputs, outputs, state_dir, forced,
              force_args=(), force_clear=()):
    """Run one stage's script unless it is up to date; record what it ran with once it succeeds.

    A forced stage really starts again: `force_args` are added to its command (extraction's
    --overwrite) and the `force_clear` folders (a training run's checkpoints) are removed first,
    so "--force train" cannot end in "nothing to do". The record keeps the unforced arguments,
    so the next plain run sees the stage as up to date.
    """
    state_file = Path(state_dir) / f"{name}.json"
    record = stage_record(args_list, inputs)
    title = f"[{number}/6] {name}"
    if not forced and is_up_to_date(state_file, record, outputs):
        print(f"{title}: up to date, skipped (--force {name} reruns it)", flush=True)
        return
    command = [*args_list, *force_args] if forced else list(args_list)
    if forced:
        for folder in map(Path, force_clear):
            remove_tree(folder)
    print(f"{title}: {Path(script).name} {' '.join(map(str, command))}", flush=True)
    check_exit(name, script, run_script(script, command))
    write_json(state_file, stage_record(args_list, inputs))  # inputs may have been rewritten


def check_exit(name, script, code):
    """Ctrl-C in a stage ends the pipeline with 130 and the stage's own one line; any other
    failure is one more line saying which stage failed and that a rerun continues."""
    if code == 130:
        raise SystemExit(130)
    if code != 0:
        raise PipelineError(f"stage {name} ({Path(script).name}) failed with exit code "
                            f"{code}; fix the error above and run the same command again")


def remove_tree(folder):
    """Delete `folder` so that a kill midway never leaves a half-deleted run that looks whole:
    it is first renamed aside (atomic), then removed."""
    if not folder.exists():
        return
    trash = folder.with_name(f".{folder.name}.deleting-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash)


def resolve_backbone(backbone, weights):
    """Stage 1, the image encoder: --backbone auto never falls back to random weights: VGG16 if
    its ImageNet file can be had, else Lite0, said in one line. Random weights only with
    --weights none, said loudly."""
    backbone, note = backbones.choose_backbone(backbone, weights)
    if note:
        print(f"note: {note}", flush=True)
    if str(weights).lower() == "none":
        print(f"WARNING: --weights none: {backbone} with RANDOM weights; the features carry no "
              "meaning, so the captions and BLEU will be meaningless", flush=True)
    return backbone


def bleu_table(results, results_file):
    """The lines of the BLEU table of an evaluate_bleu.py results.json (its dict)."""
    lines = [f"\nBLEU on the {results.get('split', 'test')} split ({results_file}):",
             f"{'mode':<10}" + "".join(f"{'BLEU-' + str(n):>9}" for n in range(1, 5))]
    for mode in ("standard", "tutorial"):
        scores = results.get("bleu", {}).get(mode)
        if scores:
            lines.append(f"{mode:<10}" + "".join(f"{scores[f'bleu{n}']:>9.3f}" for n in range(1, 5)))
    diag = results.get("diagnostics", {})
    if diag:
        lines.append(f"distinct captions {diag['distinct_captions']}/{diag['n_captions']}, "
                     f"{diag['vocabulary_used']} words used, "
                     f"{diag['copied_from_training_share']:.0%} copied from training captions")
    gallery = Path(results_file).with_name("gallery.html")
    if gallery.exists():
        lines.append(f"gallery: {gallery}")
    return lines
