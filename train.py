"""Stage 4: train a caption model (merge, init-inject, soft attention or Transformer) on image features + captions.

Usage:
    python train.py --features ../shared/flickr8k/features_efficientnet_lite0.pkl \
        --data-dir data/ --output-dir models/ [--name NAME] [--epochs 20] [--mode sequence|pairs]
    python train.py --variant attention --features data/spatial.h5 --data-dir data/
    python train.py --variant transformer --features data/spatial.h5 --data-dir data/
    python train.py --variant attention --features data/trunk_lite0.h5 --finetune-top \
        [--top-learning-rate 1e-4] [--top-batchnorm frozen|trained]   # top(trunk), top trained
    python train.py ... --cv 5 --variants merge,inject,attention,transformer \
        --features data/features.pkl --spatial data/spatial.h5 --cv-epochs 3 --cv-subset 2000
    python train.py ... --recipe tutorial          # the course's plain recipe (see below)
    python train.py ... --local-workers 2          # two workers on this machine, one run
    TF_CONFIG='{"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker",
        "index": 0}}' python train.py ...           # on each machine, its own index

Recipe: with no options the run uses the best recipe measured (--recipe best: label smoothing
0.1, the epoch of the best dev greedy BLEU-4 kept); --recipe tutorial is the course's plain
cross-entropy with the epoch of the lowest dev loss. --label-smoothing / --select-by override
either.

Several workers (docs/distributed.md): when TF_CONFIG names several workers, every worker runs
the same command (paths may differ, the files' checksums may not); --batch-size is then the
global batch over all workers (same steps, same result as one process), and only the chief
(worker 0) writes the run folder. Not with --cv or --mode pairs.

Rerunning the same command after an interruption (Ctrl-C, crash, kill, power cut) resumes from
the last finished epoch: weights, optimizer state, best-so-far, early-stopping counter, history
and the dropout RNG, so it ends with the same weights as an uninterrupted run. --overwrite
starts the run folder again from scratch.

Reads:
    --features   merge/inject: pickle {image_id: float array (D,) or (1, D)} (extract_features.py's
                 layout); D, the image input width, is taken from here (4096 VGG16 fc2, 1280
                 Lite0). float16 is cast to float32. Read with a restricted unpickler (no code runs).
                 attention/transformer: the spatial HDF5 of extract_features.py --spatial, float16
                 (N, H, W, C) grids (Lite0 7x7x1280, VGG16 14x14x512); H, W, C are taken from here
                 and the grids stay float16 in memory (0.9 GB for Flickr8k's train+dev on Lite0).
                 With --finetune-top: the trunk file of extract_features.py --trunk (the lower
                 part of Lite0 per image); the grids are the encoder top's output on it.
    --spatial    the grid variants' file when --features is the pickle (--cv over all four).
    --data-dir   prepare_text.py's outputs: meta.json (vocab_size, max_length, sentinels,
                 tokenizer_sha256), tokenizer.json, descriptions.txt, splits.json.
Writes, into the run folder <output-dir>/<name> (name defaults to the variant, plus "-pairs"):
    checkpoint-NNNN/  the whole state after NNNN epochs, written as one step (built under a
                    temporary name, fsync'd, renamed; older checkpoints are then deleted):
        last.keras      the model after epoch NNNN with its optimizer state (for resuming).
        model.keras     the kept model: lowest dev loss, or highest dev BLEU-4 with --select-by bleu.
        model.json      {variant, mode, feature_dim (D, or C of the grid), grid ([H, W], grid
                        variants), vocab_size, max_length, the variant's sizes (embed_dim, units,
                        dropout; attention + annotation_dim, attention_dim, penalty; transformer
                        d_model, heads, encoder_layers, decoder_layers, ff_dim, dropout), start_token, end_token, pad_id, start_id, end_id, oov_token,
                        tokenizer_sha256, features_file, features_sha256, data_dir,
                        epochs_trained (= best_epoch: the epochs behind model.keras), best_epoch,
                        best_val_loss, best_dev_bleu4, layers}: all a decoder needs.
        state.json      {epoch (finished epochs), best_val_loss, best_epoch, best_dev_bleu4, wait
                        (epochs without improvement), stopped_early, history [...], rng (dropout
                        seed-generator states), settings (those a resume must match)}.
        encoder_top.keras, encoder_top_last.keras   (--finetune-top) the top of the kept
                        epoch, and the newest epoch's with its Adam state; model.json then has
                        "encoder_top" {backbone, image_size, block, fingerprint, weights, seed,
                        resize_filter, batchnorm, learning_rate, file}.
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

The models, their batches and the two training modes (sequence, the default, and the tutorial's
pairs): captioning/training/trainer.py; the run folder: captioning/training/run_folder.py.
"""
import argparse
import sys
from pathlib import Path

from captioning.models.finetune import BATCHNORM_CHOICES, TOP_BATCHNORM, TOP_LEARNING_RATE
from captioning.models.registry import OPTIONS as GRID_OPTIONS
from captioning.models.registry import DROPOUT, EMBED_DIM, LEARNING_RATE, MODE, MODES, UNITS, VARIANTS
from captioning.training import distributed, trainer
from captioning.training.trainer import (BATCH_SIZE, CV_EPOCHS, CV_SUBSET, CV_VARIANTS, EPOCHS, MAX_MISSING,
                                         PATIENCE, RECIPE, RECIPES, SEED, SELECT_BY_CHOICES)
from captioning.utils import HelpFormatter, PipelineError, keras_verbose, run_cli

FEATURES = "data/features.pkl"  # extract_features.py default output; ../shared/... for real features
DATA_DIR = "data"               # prepare_text.py's output folder
OUTPUT_DIR = "models"           # run folders go here
VARIANT = "merge"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--features", type=Path, default=Path(FEATURES),
                   help="features pickle (merge, inject) or spatial .h5 (attention, transformer)")
    p.add_argument("--spatial", type=Path, default=None,
                   help="spatial .h5 for attention/transformer when --features is the pickle")
    p.add_argument("--data-dir", type=Path, default=Path(DATA_DIR), help="prepare_text.py output folder")
    p.add_argument("--output-dir", type=Path, default=Path(OUTPUT_DIR), help="parent of run folders")
    p.add_argument("--name", default="", help="run folder name ('' = variant, +'-pairs'; 'cv' for --cv)")
    p.add_argument("--variant", choices=tuple(VARIANTS), default=VARIANT,
                   help="model structure (captioning/models/registry.py)")
    p.add_argument("--mode", choices=MODES, default=MODE, help="sequence = whole captions; pairs = tutorial")
    p.add_argument("--embed-dim", type=int, default=EMBED_DIM, help="word vector size (merge, inject, attention)")
    p.add_argument("--units", type=int, default=UNITS, help="LSTM / dense width (merge, inject, attention)")
    p.add_argument("--dropout", type=float, default=DROPOUT,
                   help="on image vector and word vectors (merge, inject, attention)")
    attention, transformer = GRID_OPTIONS["attention"], GRID_OPTIONS["transformer"]
    p.add_argument("--annotation-dim", type=int, default=attention["annotation_dim"],
                   help="attention: grid cells projected to this width")
    p.add_argument("--attention-dim", type=int, default=attention["attention_dim"],
                   help="attention: hidden width of the additive attention")
    p.add_argument("--penalty", type=float, default=attention["penalty"],
                   help="attention: lambda of the doubly stochastic attention penalty")
    p.add_argument("--d-model", type=int, default=transformer["d_model"], help="transformer: width")
    p.add_argument("--heads", type=int, default=transformer["heads"], help="transformer: attention heads")
    p.add_argument("--encoder-layers", type=int, default=transformer["encoder_layers"],
                   help="transformer: blocks over the grid cells")
    p.add_argument("--decoder-layers", type=int, default=transformer["decoder_layers"],
                   help="transformer: blocks over the words")
    p.add_argument("--ff-dim", type=int, default=transformer["ff_dim"], help="transformer: feed-forward width")
    p.add_argument("--transformer-dropout", type=float, default=transformer["dropout"],
                   help="transformer: dropout after every sublayer")
    p.add_argument("--finetune-top", action="store_true",
                   help="attention/transformer: --features is a trunk file (extract_features.py "
                        "--trunk); train the encoder top's convolutions with the captioner "
                        "(docs/models.md, 'Fine-tuning the encoder top')")
    p.add_argument("--top-learning-rate", type=float, default=TOP_LEARNING_RATE,
                   help="--finetune-top: Adam's learning rate for the top")
    p.add_argument("--top-batchnorm", choices=BATCHNORM_CHOICES, default=TOP_BATCHNORM,
                   help="--finetune-top: frozen = the ImageNet statistics, inference mode; "
                        "trained = BatchNormalization trains too")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="total epochs (a rerun continues up to it)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="captions per batch (sequence mode)")
    p.add_argument("--learning-rate", type=float, default=LEARNING_RATE, help="Adam")
    p.add_argument("--recipe", choices=tuple(RECIPES), default=RECIPE,
                   help="what --label-smoothing and --select-by are when not given: best = "
                        + ", ".join(f"{k} {v}" for k, v in RECIPES["best"].items())
                        + " (the best measured); tutorial = the course's plain cross-entropy, "
                          "epoch by dev loss")
    p.add_argument("--label-smoothing", type=float, default=None,
                   help="0 = plain cross-entropy (default: the recipe's)")
    p.add_argument("--patience", type=int, default=PATIENCE, help="early stopping, in epochs")
    p.add_argument("--select-by", choices=SELECT_BY_CHOICES, default=None,
                   help="keep the epoch with the lowest dev loss, or the highest dev BLEU-4 "
                        "(greedy, standard; a few seconds per epoch) (default: the recipe's)")
    p.add_argument("--seed", type=int, default=SEED, help="same seed, same weights")
    p.add_argument("--keep-epochs", type=int, default=1,
                   help="checkpoint folders kept: the newest K epochs' (for checkpoint averaging, "
                        "docs/models.md)")
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
    distributed.add_options(p)
    args = p.parse_args(argv)
    args.verbose = keras_verbose() if args.verbose == "auto" else int(args.verbose)
    trainer.check_options(args)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.local_workers:      # this process only launches: N workers of this same command
        return distributed.launch_local(args.local_workers,
                                        distributed.without_option(argv, "--local-workers"), __file__)
    workers = distributed.join(args.connect_timeout, one_process=(
        "--cv trains its folds in one process" if args.cv else
        "--finetune-top trains in one process" if args.finetune_top else
        "--mode pairs trains one photo per batch in one process" if args.mode == "pairs" else None))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.cv else [args.variant]
    for path in {trainer.features_path(args, v) for v in variants}:
        if not path.is_file():
            raise PipelineError(f"missing features file {path}")
    name = args.name or ("cv" if args.cv else args.variant + ("-pairs" if args.mode == "pairs" else ""))
    run_dir = args.output_dir / name
    matrix, train, dev, config, row_of_id = trainer.prepare_inputs(args)
    shape = "x".join(str(s) for s in [*config.get("grid", []), config["feature_dim"]])
    print(f"{len(train)} training / {len(dev)} dev captions, features {shape}, "
          f"vocab {config['vocab_size']}, max_length {config['max_length']}", flush=True)
    if args.cv:
        trainer.cross_validate(args, run_dir, (matrix, train, dev, config, row_of_id))
        return 0
    scorer = trainer.dev_bleu_scorer(args.data_dir, matrix, row_of_id) if args.select_by == "bleu" else None
    state = (distributed.train_run(workers, args, run_dir, matrix, train, dev, config, scorer) if workers
             else trainer.train_run(args, run_dir, matrix, train, dev, config, scorer))
    if state is None:           # a worker other than the chief: the chief reports the run
        return 0
    best = (f"dev BLEU-4 {state['best_dev_bleu4']:.4f}" if state.get("best_dev_bleu4") is not None
            else f"dev loss {state['best_val_loss']:.4f}")
    print(f"best {best} at epoch {state['best_epoch']}; model in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
