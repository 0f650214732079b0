"""One command from nothing to a BLEU table: runs the six stages in order.

Usage:
    python run_pipeline.py --sample                      # offline first run, bundled 320 images
    python run_pipeline.py --download                    # full Flickr8k into data/flickr8k/
    python run_pipeline.py --data-dir ../shared/flickr8k --features F.pkl   # precomputed features

Stages (each is the script of the same name, called with the arguments printed before it):
    1 encoder   choose the image encoder: VGG16 if its ImageNet weights can be had, else Lite0
    2 features  extract_features.py  -> <out>/data/<name>/features.pkl
    3 text      prepare_text.py      -> <out>/data/<name>/{descriptions.txt,tokenizer.json,...}
    4 train     train.py             -> <out>/models/<name>/
    5 caption   generate_caption.py  -> prints captions for a few test images
    6 bleu      evaluate_bleu.py     -> <out>/results/<name>/{results.json,captions.tsv,gallery.html}
<name> is "sample" with --sample, else "flickr8k".

Reads the dataset in --data-dir (official layout: Flickr8k_text/ and Flicker8k_Dataset/).
Writes, besides the stages' outputs, <out>/data/<name>/pipeline_state/<stage>.json: the
arguments and the size+mtime of the inputs each stage last finished with. A stage whose record
matches and whose outputs exist is skipped (it says so); `--force STAGE` reruns it and all
after it. An interrupted run resumes: finished stages are skipped and the interrupted one
continues from its own checkpoint (feature extraction and training both resume).
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import download_flickr8k  # noqa: E402  (the stages import no TensorFlow until they run)
import evaluate_bleu  # noqa: E402
import extract_features  # noqa: E402
import generate_caption  # noqa: E402
import prepare_text  # noqa: E402
from captioning.data import text  # noqa: E402
import train  # noqa: E402
from captioning.encoders import backbones  # noqa: E402
from captioning.utils import HelpFormatter, PipelineError, read_json, run_cli, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent
SAMPLE_DIR = REPO / "data" / "sample"
STAGES = ["encoder", "features", "text", "train", "caption", "bleu"]
DEFAULT_EPOCHS = 20        # full run; early stopping on dev loss usually ends it sooner
SAMPLE_EPOCHS = 15         # 600 training images: ~15 epochs until dev loss stops falling
DEFAULT_BEAM = 3
CAPTION_EXAMPLES = 5       # test images captioned on screen by stage 5
# The training recipe behind the README's results (chosen on the dev split): train.py's own
# defaults stay the tutorial's (plain cross-entropy, best epoch by dev loss).
TRAIN_RECIPE = ["--label-smoothing", "0.1", "--select-by", "bleu"]
# On the sample, dev BLEU-4 stays 0 for the first epochs (40-60 dev images, short captions), so
# choosing (and early-stopping) by it ends training at epoch 4 with one caption for every photo;
# dev loss is the signal there (measured: README, "The sample").
SAMPLE_RECIPE = ["--label-smoothing", "0.1", "--select-by", "loss"]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--sample", action="store_true",
                        help=f"use the bundled offline sample ({SAMPLE_DIR.relative_to(REPO)})")
    parser.add_argument("--data-dir", type=Path, default=Path("data/flickr8k"),
                        help="Flickr8k location (ignored with --sample)")
    parser.add_argument("--download", action="store_true",
                        help="download Flickr8k (~1.1 GB) into --data-dir if missing, no question")
    parser.add_argument("--out-dir", type=Path, default=Path("."),
                        help="outputs go to OUT/data/NAME, OUT/models/NAME, OUT/results/NAME")
    parser.add_argument("--backbone", default="auto", choices=["auto", *backbones.BACKBONES],
                        help="image encoder; auto = VGG16 when its ImageNet weights can be had, "
                             "else EfficientNet-Lite0 (ImageNet weights from its pip package)")
    parser.add_argument("--weights", default="imagenet",
                        help="encoder weights: imagenet, none (random: meaningless captions, "
                             "only when asked), or a weights file")
    parser.add_argument("--features", type=Path, default=None,
                        help="use this features.pkl instead of extracting (skips stages 1-2)")
    parser.add_argument("--cleaning", default="default", choices=["default", "tutorial"])
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs (default {DEFAULT_EPOCHS}, {SAMPLE_EPOCHS} "
                             "with --sample)")
    parser.add_argument("--beam", type=int, default=DEFAULT_BEAM, help="beam width for BLEU")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="feature-extraction batch size (default: the script's)")
    parser.add_argument("--force", choices=STAGES, default=None,
                        help="rerun this stage and every later one")
    parser.add_argument("--seed", type=int, default=train.SEED,
                        help="training seed (same seed, same model)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- up-to-date bookkeeping

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


def run_stage(number, name, main_fn, args_list, inputs, outputs, state_dir, forced,
              force_args=(), force_clear=()):
    """Run one stage unless it is up to date; record what it ran with once it succeeds.

    A forced stage really starts again: `force_args` are added to its command (extraction's
    --overwrite) and the `force_clear` folders (a training run's checkpoints) are removed first,
    so "--force train" cannot end in "nothing to do". The record keeps the unforced arguments,
    so the next plain run sees the stage as up to date.
    """
    state_file = state_dir / f"{name}.json"
    record = stage_record(args_list, inputs)
    title = f"[{number}/6] {name}"
    if not forced and is_up_to_date(state_file, record, outputs):
        print(f"{title}: up to date, skipped (--force {name} reruns it)", flush=True)
        return
    command = [*args_list, *force_args] if forced else list(args_list)
    if forced:
        for folder in map(Path, force_clear):
            remove_tree(folder)
    print(f"{title}: {main_fn.__module__}.py {' '.join(map(str, command))}", flush=True)
    code = run_cli(main_fn, [str(a) for a in command])
    check_exit(name, main_fn, code)
    write_json(state_file, stage_record(args_list, inputs))  # inputs may have been rewritten


def check_exit(name, main_fn, code):
    """Ctrl-C in a stage ends the pipeline with 130 and the stage's own one line; any other
    failure is one more line saying which stage failed and that a rerun continues."""
    if code == 130:
        raise SystemExit(130)
    if code != 0:
        raise PipelineError(f"stage {name} ({main_fn.__module__}.py) failed with exit code "
                            f"{code}; fix the error above and run the same command again")


def remove_tree(folder):
    """Delete `folder` so that a kill midway never leaves a half-deleted run that looks whole:
    it is first renamed aside (atomic), then removed."""
    if not folder.exists():
        return
    trash = folder.with_name(f".{folder.name}.deleting-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash)


# ---------------------------------------------------------------- the stages

def resolve_backbone(backbone, weights):
    """--backbone auto never falls back to random weights: VGG16 if its ImageNet file can be
    had, else Lite0, said in one line. Random weights only with --weights none, said loudly."""
    backbone, note = backbones.choose_backbone(backbone, weights)
    if note:
        print(f"note: {note}", flush=True)
    if str(weights).lower() == "none":
        print(f"WARNING: --weights none: {backbone} with RANDOM weights; the features carry no "
              "meaning, so the captions and BLEU will be meaningless", flush=True)
    return backbone


def main(argv=None):
    args = parse_args(argv)
    name = "sample" if args.sample else "flickr8k"
    data_dir = SAMPLE_DIR if args.sample else args.data_dir
    epochs = args.epochs or (SAMPLE_EPOCHS if args.sample else DEFAULT_EPOCHS)
    work = args.out_dir / "data" / name
    run_dir = args.out_dir / "models" / name
    results = args.out_dir / "results" / name
    state_dir = work / "pipeline_state"
    forced = set(STAGES[STAGES.index(args.force):]) if args.force else set()

    if not args.sample:
        download_flickr8k.ensure_flickr8k(data_dir, assume_yes=args.download)
    missing = download_flickr8k.missing_files(data_dir)
    if missing:
        raise PipelineError(f"{data_dir} lacks {', '.join(missing)}")
    images = data_dir / "Flicker8k_Dataset"
    text_dir = data_dir / "Flickr8k_text"

    # Stages 1-2: features (or the file the user gave).
    if args.features:
        features = args.features
        if not features.is_file():
            raise PipelineError(f"--features file not found: {features}")
        print(f"[1-2/6] encoder, features: using {features} (given with --features)")
    else:
        features = work / "features.pkl"
        backbone = resolve_backbone(args.backbone, args.weights)
        print(f"[1/6] encoder: {backbone}, weights {args.weights}")
        extract_args = ["--images", images, "--output", features, "--backbone", backbone,
                        "--weights", args.weights]
        if args.batch_size:
            extract_args += ["--batch-size", args.batch_size]
        run_stage(2, "features", extract_features.main, extract_args, [images],
                  [features], state_dir, "features" in forced, force_args=["--overwrite"])

    # Stage 3: captions -> vocabulary, splits, metadata.
    run_stage(3, "text", prepare_text.main,
              ["--text-dir", text_dir, "--output-dir", work, "--cleaning", args.cleaning],
              [text_dir], [work / "meta.json", work / "tokenizer.json"], state_dir,
              "text" in forced)

    # Stage 4: training (resumes from its own checkpoint if interrupted).
    train_args = ["--features", features, "--data-dir", work,
                  "--output-dir", args.out_dir / "models", "--name", name,
                  "--epochs", epochs, "--seed", args.seed,
                  *(SAMPLE_RECIPE if args.sample else TRAIN_RECIPE)]
    run_stage(4, "train", train.main, train_args,
              [features, work / "meta.json", work / "tokenizer.json"],
              [run_dir / "model.keras", run_dir / "model.json"], state_dir, "train" in forced,
              force_clear=[run_dir])

    # Stage 5: caption a few test images, from the cached features.
    test_ids = text.load_splits(work)["test"][:CAPTION_EXAMPLES]
    print(f"[5/6] caption: {len(test_ids)} test images")
    code = run_cli(generate_caption.main, ["--model", str(run_dir), "--features", str(features),
                                           "--data-dir", str(work), "--ids", *test_ids])
    check_exit("caption", generate_caption.main, code)

    # Stage 6: BLEU on the test split, with the gallery.
    run_stage(6, "bleu", evaluate_bleu.main,
              ["--features", features, "--data-dir", work, "--model", run_dir, "--split",
               "test", "--beam", args.beam, "--output", results, "--images", images],
              [features, run_dir / "model.keras", work / "meta.json"],
              [results / "results.json"], state_dir, "bleu" in forced)
    print_summary(results / "results.json")
    return 0


def print_summary(results_file):
    """The BLEU table from results.json, as the last thing a user sees."""
    results = read_json(results_file)
    print(f"\nBLEU on the {results.get('split', 'test')} split ({results_file}):")
    print(f"{'mode':<10}" + "".join(f"{'BLEU-' + str(n):>9}" for n in range(1, 5)))
    for mode in ("standard", "tutorial"):
        scores = results.get("bleu", {}).get(mode)
        if scores:
            print(f"{mode:<10}" + "".join(f"{scores[f'bleu{n}']:>9.3f}" for n in range(1, 5)))
    diag = results.get("diagnostics", {})
    if diag:
        print(f"distinct captions {diag['distinct_captions']}/{diag['n_captions']}, "
              f"{diag['vocabulary_used']} words used, "
              f"{diag['copied_from_training_share']:.0%} copied from training captions")
    gallery = Path(results_file).with_name("gallery.html")
    if gallery.exists():
        print(f"gallery: {gallery}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
