"""Train the VSE++ image-sentence embedding on the training split.

Usage:
    python prepare_text.py --text-dir ../shared/flickr8k/Flickr8k_text --output-dir data
    python train_retrieval.py --features ../shared/flickr8k/features_efficientnet_lite0.pkl \\
        --backbone lite0 --data-dir data --output-dir models --name vse
    python train_retrieval.py ... --local-workers 2   # two workers on this machine, one run
Rerunning the same command after an interruption resumes after the last finished epoch
(weights, optimizer state, best-so-far, early-stopping counter); a folder holding a run with
other settings is refused. Under a TF_CONFIG naming several workers every worker runs the same
command, --batch-size is the global batch (the pairs of all workers are each other's
negatives, as in one process) and only the chief writes the run folder (docs/distributed.md).

Reads:
    --features   pickle {image_id: vector (D,) or (1, D)} (extract_features.py's layout; float16
                 is cast), read with captioning.data.features' restricted unpickler. D, the image
                 input width, comes from here.
                 Its `<stem>.settings.json` (written by extract_features.py), when present, gives
                 the backbone and the extractor fingerprint recorded in model.json.
    --data-dir   prepare_text.py's outputs: meta.json, tokenizer.json (checked against meta's
                 sha256), descriptions.txt, splits.json.
Writes, into <output-dir>/<name>/, train.py's layout: one checkpoint-NNNN folder per epoch
(built under a temporary name, fsync'd, renamed: a kill at any moment leaves the previous epoch
or this one, never a mix; captioning.training.run_folder), `current` (a link to it) and, as links
through `current`:
    model.keras    the best epoch by dev R@1+R@5+R@10 summed over both directions (rsum).
    model.json     {kind "vse++", feature_dim, embed_dim, word_dim, vocab_size, max_length,
                    margin, backbone, features_file, features_sha256, features_fingerprint,
                    tokenizer_sha256, cleaning, data_dir, epochs_trained, best_epoch,
                    best_dev_rsum, best_dev (both directions' R@K and ranks), layers}.
    history.csv    epoch, loss, max_violation (1 hardest negative, 0 warm-up), dev R@1/5/10 of
                   both directions, dev rsum, seconds, lr.
  inside the checkpoint only (for resuming):
    last.keras     the last finished epoch with its optimizer state.
    state.json     {epoch, best_epoch, best_dev_rsum, wait, stopped_early, history}.
  and beside it:
    settings.json  every argument plus derived values (feature_dim, vocab_size, counts).

Every training caption is one example per epoch; batches of --batch-size come from
length-sorted pools (captioning.data.inputs.plan_batches), so a batch is padded little. The loss (VSE++,
captioning/retrieval/vse.py) uses the other pairs of the batch as negatives: the hardest one, or
during --warmup-epochs the sum of all of them. Dev selection embeds the 1000 dev images and
their 5000 captions after every epoch and ranks them (captioning/retrieval/ranking.py).
"""
import argparse
import sys
from pathlib import Path

from captioning.retrieval import training, vse
from captioning.training import distributed
from captioning.utils import HelpFormatter, PipelineError, keras_verbose, run_cli

FEATURES = "data/features.pkl"
DATA_DIR = "data"
OUTPUT_DIR = "models"
NAME = "vse"
BACKBONE = "auto"         # auto = from the features file's settings.json; else vgg16 | lite0 | ...


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--features", type=Path, default=Path(FEATURES), help="features pickle")
    p.add_argument("--data-dir", type=Path, default=Path(DATA_DIR), help="prepare_text.py output folder")
    p.add_argument("--output-dir", type=Path, default=Path(OUTPUT_DIR), help="parent of run folders")
    p.add_argument("--name", default=NAME, help="run folder name")
    p.add_argument("--backbone", default=BACKBONE,
                   help="extractor that made --features (vgg16, lite0, ...); auto = its settings.json")
    p.add_argument("--embed-dim", type=int, default=vse.EMBED_DIM, help="joint space size = GRU units")
    p.add_argument("--word-dim", type=int, default=vse.WORD_DIM, help="word vector size")
    p.add_argument("--margin", type=float, default=vse.MARGIN, help="hinge margin")
    p.add_argument("--epochs", type=int, default=training.EPOCHS, help="total epochs (a rerun continues up to it)")
    p.add_argument("--batch-size", type=int, default=training.BATCH_SIZE, help="pairs per batch")
    p.add_argument("--learning-rate", type=float, default=training.LEARNING_RATE, help="Adam")
    p.add_argument("--clipnorm", type=float, default=training.CLIPNORM, help="gradient norm clipping")
    p.add_argument("--warmup-epochs", type=int, default=training.WARMUP_EPOCHS,
                   help="first epochs with summed negatives (VSE0) before the hardest negative")
    p.add_argument("--lr-decay-epoch", type=int, default=training.LR_DECAY_EPOCH,
                   help="epoch (1-based) from which the learning rate is 10x lower; 0 = never")
    p.add_argument("--patience", type=int, default=training.PATIENCE, help="early stopping, in epochs")
    p.add_argument("--seed", type=int, default=training.SEED, help="same seed, same weights")
    p.add_argument("--max-missing", type=float, default=training.MAX_MISSING,
                   help="largest fraction of train+dev images allowed to lack features")
    p.add_argument("--verbose", type=int, default=None, choices=(0, 1, 2),
                   help="Keras progress: 0 none, 1 bar, 2 a line per epoch (default: 1 on a terminal, else 2)")
    distributed.add_options(p)
    args = p.parse_args(argv)
    if args.verbose is None:
        args.verbose = keras_verbose()
    for name in ("embed_dim", "word_dim", "epochs", "batch_size", "patience"):
        if getattr(args, name) < 1:
            raise PipelineError(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch_size < 2:
        raise PipelineError("--batch-size must be at least 2 (the other pairs are the negatives)")
    if args.warmup_epochs < 0 or args.lr_decay_epoch < 0 or args.margin <= 0 or not 0 <= args.max_missing <= 1:
        raise PipelineError("--warmup-epochs and --lr-decay-epoch must be >= 0, --margin > 0, "
                            "--max-missing in [0, 1]")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.local_workers:      # this process only launches: N workers of this same command
        return distributed.launch_local(args.local_workers,
                                        distributed.without_option(argv, "--local-workers"), __file__)
    workers = distributed.join(args.connect_timeout)
    if not args.features.is_file():
        raise PipelineError(f"missing features file {args.features}")
    run_dir = args.output_dir / args.name
    matrix, train, dev, config = training.prepare_inputs(args)
    print(f"{len(train)} training / {len(dev)} dev captions, feature_dim {config['feature_dim']} "
          f"(backbone {config['backbone']}), vocab {config['vocab_size']}", flush=True)
    state = (training.train_run_workers(workers, args, run_dir, matrix, train, dev, config) if workers
             else training.train_run(args, run_dir, matrix, train, dev, config))
    if state is None:           # a worker other than the chief: the chief reports the run
        return 0
    best = state["best_dev"]
    print(f"best dev rsum {state['best_dev_rsum']:.1f} at epoch {state['best_epoch']} "
          f"(image->text R@1 {best['image_to_text']['r1']:.1f}, text->image R@1 "
          f"{best['text_to_image']['r1']:.1f}); model in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
