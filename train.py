"""Stage 4: train the caption model (merge or init-inject CNN+LSTM) on image features + captions.

Usage:
    python train.py --features ../shared/flickr8k/features_efficientnet_lite0.pkl \
        --data-dir data/ --output-dir models/ [--name NAME] [--epochs 20] [--mode sequence|pairs]
    python train.py ... --cv 5 --variants merge,inject --cv-epochs 3 --cv-subset 2000

Rerunning the same command after an interruption (Ctrl-C, crash, kill, power cut) resumes from
the last finished epoch: weights, optimizer state, best-so-far, early-stopping counter, history
and the dropout RNG, so it ends with the same weights as an uninterrupted run. --overwrite
starts the run folder again from scratch.

Reads:
    --features   pickle {image_id: float array (D,) or (1, D)} (extract_features.py's layout);
                 D, the image input width, is taken from here (4096 VGG16 fc2, 1280 Lite0).
                 float16 is cast to float32. Read with a restricted unpickler (no code runs).
    --data-dir   prepare_text.py's outputs: meta.json (vocab_size, max_length, sentinels,
                 tokenizer_sha256), tokenizer.json, descriptions.txt, splits.json.
Writes, into the run folder <output-dir>/<name> (name defaults to the variant, plus "-pairs"):
    checkpoint-NNNN/  the whole state after NNNN epochs, written as one step (built under a
                    temporary name, fsync'd, renamed; older checkpoints are then deleted):
        last.keras      the model after epoch NNNN with its optimizer state (for resuming).
        model.keras     the kept model: lowest dev loss, or highest dev BLEU-4 with --select-by bleu.
        model.json      {variant, mode, feature_dim, vocab_size, max_length, embed_dim, units,
                        dropout, start_token, end_token, pad_id, start_id, end_id, oov_token,
                        tokenizer_sha256, features_file, features_sha256, data_dir,
                        epochs_trained (= best_epoch: the epochs behind model.keras), best_epoch,
                        best_val_loss, best_dev_bleu4, layers}: all a decoder needs.
        state.json      {epoch (finished epochs), best_val_loss, best_epoch, best_dev_bleu4, wait
                        (epochs without improvement), stopped_early, history [...], rng (dropout
                        seed-generator states), settings (those a resume must match)}.
        history.csv     epoch,loss,val_loss,dev_bleu4,seconds,lr (losses = mean cross-entropy per
                        predicted word, nats; epoch 1 = first epoch).
        loss.png        training and dev loss per epoch.
    current         a link to the newest checkpoint, swapped atomically after each epoch.
    model.keras, model.json, history.csv, loss.png
                    links through `current`, so model.keras and model.json always come from the
                    same checkpoint (on a system without symbolic links: copies).
    settings.json   every argument of the run plus derived values (feature_dim, vocab, sizes).
    cv.csv          (--cv only, in <output-dir>/<name>, name default "cv") variant,fold,
                    val_loss,best_epoch,seconds per fold, then a mean and a std row per variant.

The models (merge, inject) and their layer names are described in captioning/models.py.

Training modes:
  sequence (default): whole captions, input = ids[:-1], target = ids[1:], one masked sparse
      cross-entropy over all real target words (padding targets masked out). Batches are
      drawn from length-sorted pools and trimmed to their longest caption (bucketing), so
      almost no work is spent on padding. No one-hot targets, no pair expansion.
  pairs: the tutorial's progressive loading - one photo per batch, all its (prefix -> next
      word) pairs, prefixes pre-padded to max_length. Same loss per predicted word; kept
      for comparison (benchmarks/bench_train.py) and ~20x slower.
"""
import argparse
import sys
from pathlib import Path

from captioning import training
from captioning.models import DROPOUT, EMBED_DIM, LABEL_SMOOTHING, LEARNING_RATE, MODE, MODES, UNITS, VARIANTS
from captioning.training import (BATCH_SIZE, CV_EPOCHS, CV_SUBSET, CV_VARIANTS, EPOCHS, MAX_MISSING,
                                 PATIENCE, SEED, SELECT_BY)
from captioning.utils import HelpFormatter, PipelineError, keras_verbose, run_cli

FEATURES = "data/features.pkl"  # extract_features.py default output; ../shared/... for real features
DATA_DIR = "data"               # prepare_text.py's output folder
OUTPUT_DIR = "models"           # run folders go here
VARIANT = "merge"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--features", type=Path, default=Path(FEATURES), help="features pickle")
    p.add_argument("--data-dir", type=Path, default=Path(DATA_DIR), help="prepare_text.py output folder")
    p.add_argument("--output-dir", type=Path, default=Path(OUTPUT_DIR), help="parent of run folders")
    p.add_argument("--name", default="", help="run folder name ('' = variant, +'-pairs'; 'cv' for --cv)")
    p.add_argument("--variant", choices=tuple(VARIANTS), default=VARIANT,
                   help="model structure (captioning/models.py)")
    p.add_argument("--mode", choices=MODES, default=MODE, help="sequence = whole captions; pairs = tutorial")
    p.add_argument("--embed-dim", type=int, default=EMBED_DIM, help="word vector size")
    p.add_argument("--units", type=int, default=UNITS, help="LSTM / dense width")
    p.add_argument("--dropout", type=float, default=DROPOUT, help="on image vector and word vectors")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="total epochs (a rerun continues up to it)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="captions per batch (sequence mode)")
    p.add_argument("--learning-rate", type=float, default=LEARNING_RATE, help="Adam")
    p.add_argument("--label-smoothing", type=float, default=LABEL_SMOOTHING, help="0 = plain cross-entropy")
    p.add_argument("--patience", type=int, default=PATIENCE, help="early stopping, in epochs")
    p.add_argument("--select-by", choices=("loss", "bleu"), default=SELECT_BY,
                   help="keep the epoch with the lowest dev loss, or the highest dev BLEU-4 "
                        "(greedy, standard; a few seconds per epoch)")
    p.add_argument("--seed", type=int, default=SEED, help="same seed, same weights")
    p.add_argument("--max-missing", type=float, default=MAX_MISSING,
                   help="largest fraction of train+dev images allowed to lack features")
    p.add_argument("--fail-on-missing", action="store_true", help="any image without features is an error")
    p.add_argument("--cv", type=int, default=0, help="K-fold cross-validation instead of training (0 = off)")
    p.add_argument("--variants", default=CV_VARIANTS, help="variants compared by --cv")
    p.add_argument("--cv-epochs", type=int, default=CV_EPOCHS, help="epochs per fold")
    p.add_argument("--cv-subset", type=int, default=CV_SUBSET, help="training images used by --cv (0 = all)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run folder's checkpoints and train from scratch")
    p.add_argument("--verbose", choices=("auto", "0", "1", "2"), default="auto",
                   help="Keras progress: 0 none, 1 a bar, 2 one line per epoch; "
                        "auto = a bar on a terminal, else one line per epoch")
    args = p.parse_args(argv)
    args.verbose = keras_verbose() if args.verbose == "auto" else int(args.verbose)
    for name in ("embed_dim", "units", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise PipelineError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.dropout < 1 or not 0 <= args.label_smoothing < 1 or not 0 <= args.max_missing <= 1:
        raise PipelineError("--dropout, --label-smoothing and --max-missing must be in [0, 1)")
    bad = [v for v in args.variants.split(",") if v.strip() and v.strip() not in VARIANTS]
    if bad:
        raise PipelineError(f"unknown variant {bad[0]!r} in --variants (choose from {', '.join(VARIANTS)})")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.features.is_file():
        raise PipelineError(f"missing features file {args.features}")
    name = args.name or ("cv" if args.cv else args.variant + ("-pairs" if args.mode == "pairs" else ""))
    run_dir = args.output_dir / name
    matrix, train, dev, config, row_of_id = training.prepare_inputs(args)
    print(f"{len(train)} training / {len(dev)} dev captions, feature_dim {config['feature_dim']}, "
          f"vocab {config['vocab_size']}, max_length {config['max_length']}", flush=True)
    if args.cv:
        training.cross_validate(args, run_dir, matrix, train, config)
        return 0
    scorer = training.dev_bleu_scorer(args.data_dir, matrix, row_of_id) if args.select_by == "bleu" else None
    state = training.train_run(args, run_dir, matrix, train, dev, config, scorer)
    best = (f"dev BLEU-4 {state['best_dev_bleu4']:.4f}" if state.get("best_dev_bleu4") is not None
            else f"dev loss {state['best_val_loss']:.4f}")
    print(f"best {best} at epoch {state['best_epoch']}; model in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
