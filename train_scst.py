"""Stage 4b: self-critical sequence training (SCST) of a trained captioner on CIDEr-D rewards.

Usage:
    python train_scst.py --init models/merge --features ../shared/flickr8k/features_efficientnet_lite0.pkl \\
        --data-dir data --output-dir models [--name merge-scst] [--epochs 10] [--samples 5]
        [--batch-images 50] [--learning-rate 5e-5] [--baseline mean|greedy] [--patience 3] [--seed 1]
        [--select-decoding greedy|beam]
    python train_scst.py --init models/attention --features data/grids_lite0.h5 --data-dir data

Fine-tunes the model of a train.py run folder (--init) with SCST (Rennie et al. 2017): for each
batch of training images, the fast decoder produces the greedy caption and --samples sampled
captions per image; each sample's advantage is its CIDEr-D against the image's 5 training
captions minus a baseline (--baseline: the mean of the image's other samples, Luo 2020, or the
greedy caption's, Rennie et al.); loss = -mean(advantage x log p(sample)), the log-probabilities
coming from one batched forward pass of the Keras model on the sampled tokens. The reward's CIDEr-D document
frequencies come from the training references and are computed once (captioning.evaluation.coco_metrics.
CiderD). After every epoch the dev split is captioned greedily and scored with CIDEr-D (COCO
convention, document frequencies from the dev references); model.keras keeps the best epoch,
and epoch 0 is the --init model itself, so a run that never beats it keeps it. With
--select-decoding beam the dev split is also captioned with beam 3 (length normalisation
alpha 0.7, decoding.ALPHA) and that CIDEr-D picks the epoch instead: for a model that will be
used with beam search. The test split is never touched: score it once with evaluate_bleu.py.
Every variant works: merge and inject on pooled features, attention and transformer on the
spatial grids of extract_features.py --spatial (the kind comes from the --init model.json; the
grids are read a batch of images at a time, so memory stays that of a batch, not the ~0.9 GB of
Flickr8k's Lite0 train + dev grids). A model with a fine-tuned encoder top (train.py
--finetune-top) reads the trunk file (extract_features.py --trunk): its top, kept as trained,
makes the grids once (in memory, float16), SCST trains the captioner, and every checkpoint holds
the top beside it, so the run folder is a fine-tuned model too. The attention model's doubly stochastic penalty is a
cross-entropy training term and is not part of the SCST loss. See captioning/training/scst.py
and captioning/training/scst_run.py.

Rerunning the same command after an interruption continues after the last finished epoch.

Reads:
    --init DIR        train.py run folder: model.keras + model.json (variant, tokenizer sha256,
                      feature width, grid [H, W] for the grid models).
    --features FILE   merge/inject: the {image_id: vector} pickle (or features.npy); attention/
                      transformer: the spatial HDF5 file (float16 (N, H, W, C)), or the trunk
                      file for a model with a fine-tuned top. Every train and
                      dev image must be in it, with the shape the model was trained on; the
                      other kind of file, or another shape, is a one-line error naming both.
    --data-dir DIR    prepare_text.py's outputs: tokenizer.json (must be the model's),
                      descriptions.txt (rewards), references.json (dev CIDEr-D), splits.json.
Writes, into <output-dir>/<name>, one checkpoint-NNNN folder per epoch (built under a
temporary name, fsync'd, renamed: a kill at any moment leaves the previous epoch or this one,
never a mix; train.py's layout, captioning.training.run_folder), `current` (a link to it) and, as
links through `current`:
    model.keras       the best epoch by dev CIDEr-D (epoch 0 = the --init model).
    model.json        the --init model.json plus "scst": {init, epochs_trained, best_epoch,
                      best_dev_cider_d, samples, batch_images, learning_rate, seed}
                      (--select-decoding beam: select_decoding and best_dev_beam_cider_d instead).
    history.csv       epoch, sample_reward, greedy_reward (mean training CIDEr-D), loss,
                      dev_cider_d, dev_distinct_captions, dev_vocabulary_used, seconds, cpu_seconds
                      (+ dev_beam_cider_d with --select-decoding beam).
    encoder_top.keras a fine-tuned model's top, unchanged: inside each checkpoint folder, as
                      train.py writes it (found through `current`).
Inside the checkpoint only (for resuming):
    last.keras        the model and Adam state after the last finished epoch.
    state.json        {epoch, best_epoch, best_dev_cider_d, wait, stopped_early, history}.
And settings.json: the arguments plus derived values.
"""
import argparse
import sys
from pathlib import Path

from captioning.inference import decoding
from captioning.training import distributed, scst, scst_run
from captioning.utils import HelpFormatter, PipelineError, run_cli

DATA_DIR = "data"
OUTPUT_DIR = "models"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--init", type=Path, required=True, help="train.py run folder to fine-tune")
    p.add_argument("--features", type=Path, required=True,
                   help="features the model was trained on: pickle (merge, inject) or spatial .h5 (attention, transformer)")
    p.add_argument("--data-dir", type=Path, default=Path(DATA_DIR), help="prepare_text.py output folder")
    p.add_argument("--output-dir", type=Path, default=Path(OUTPUT_DIR), help="parent of run folders")
    p.add_argument("--name", default="", help="run folder name ('' = the --init folder's name + '-scst')")
    p.add_argument("--epochs", type=int, default=scst_run.EPOCHS,
                   help="total SCST epochs (a rerun continues up to it)")
    p.add_argument("--samples", type=int, default=scst.SAMPLES, help="sampled captions per image per update")
    p.add_argument("--batch-images", type=int, default=scst.BATCH_IMAGES, help="images per update")
    p.add_argument("--learning-rate", type=float, default=scst.LEARNING_RATE, help="Adam")
    p.add_argument("--baseline", choices=scst.BASELINES, default=scst.BASELINE,
                   help="what a sample's CIDEr-D is compared with: the mean of the image's other "
                        "samples (Luo 2020) or the greedy caption's (Rennie et al. 2017)")
    p.add_argument("--patience", type=int, default=scst_run.PATIENCE,
                   help="early stopping on dev CIDEr-D, in epochs")
    p.add_argument("--seed", type=int, default=scst_run.SEED, help="same seed, same run")
    p.add_argument("--select-decoding", choices=scst_run.SELECT_DECODINGS, default=scst_run.SELECT_DECODING,
                   help=f"the decoding whose dev CIDEr-D picks the kept epoch: greedy, or beam "
                        f"{scst_run.BEAM} (alpha {decoding.ALPHA}) for a model used with beam search")
    args = p.parse_args(argv)
    for name in ("epochs", "samples", "batch_images", "patience"):
        if getattr(args, name) < 1:
            raise PipelineError(f"--{name.replace('_', '-')} must be at least 1")
    if args.baseline == "mean" and args.samples < 2:
        raise PipelineError("--baseline mean compares each sample with the image's others: "
                            "--samples must be at least 2")
    if not args.learning_rate > 0:
        raise PipelineError("--learning-rate must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    # sampling and CIDEr-D rewards run in Python per caption: SCST trains in one process
    distributed.join(one_process="train_scst.py trains in one process")
    for path, what in ((args.features, "features file"), (args.data_dir, "data folder")):
        if not path.exists():
            raise PipelineError(f"missing {what} {path}")
    run_dir, state = scst_run.train_run(args)
    if state is not None:
        which = "" if args.select_decoding == "greedy" else f" (beam {scst_run.BEAM})"
        print(f"best dev CIDEr-D{which} {state[scst_run.selection_key(args.select_decoding)]:.4f} at "
              f"SCST epoch {state['best_epoch']}; model in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
