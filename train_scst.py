"""Stage 4b: self-critical sequence training (SCST) of a trained captioner on CIDEr-D rewards.

Usage:
    python train_scst.py --init models/merge --features ../shared/flickr8k/features_efficientnet_lite0.pkl \\
        --data-dir data --output-dir models [--name merge-scst] [--epochs 10] [--samples 5]
        [--batch-images 50] [--learning-rate 5e-5] [--baseline mean|greedy] [--patience 3] [--seed 1]

Fine-tunes the model of a train.py run folder (--init) with SCST (Rennie et al. 2017): for each
batch of training images, the fast decoder produces the greedy caption and --samples sampled
captions per image; each sample's advantage is its CIDEr-D against the image's 5 training
captions minus a baseline (--baseline: the mean of the image's other samples, Luo 2020, or the
greedy caption's, Rennie et al.); loss = -mean(advantage x log p(sample)), the log-probabilities
coming from one batched forward pass of the Keras model on the sampled tokens. The reward's CIDEr-D document
frequencies come from the training references and are computed once (captioning.evaluation.coco_metrics.
CiderD). After every epoch the dev split is captioned greedily and scored with CIDEr-D (COCO
convention, document frequencies from the dev references); model.keras keeps the best epoch,
and epoch 0 is the --init model itself, so a run that never beats it keeps it. The test split is
never touched: score it once with evaluate_bleu.py. Any variant with a step builder in
captioning.inference.decoding works (merge, inject, ...). See captioning/training/scst.py.

Rerunning the same command after an interruption continues after the last finished epoch.

Reads:
    --init DIR        train.py run folder: model.keras + model.json (its tokenizer sha256, feature width).
    --features FILE   {image_id: vector} pickle; every train and dev image must be in it, with
                      the width the model was trained on.
    --data-dir DIR    prepare_text.py's outputs: tokenizer.json (must be the model's),
                      descriptions.txt (rewards), references.json (dev CIDEr-D), splits.json.
Writes, into <output-dir>/<name>, one checkpoint-NNNN folder per epoch (built under a
temporary name, fsync'd, renamed: a kill at any moment leaves the previous epoch or this one,
never a mix; train.py's layout, captioning.training.trainer.write_checkpoint), `current` (a link to
it) and, as links through `current`:
    model.keras       the best epoch by dev CIDEr-D (epoch 0 = the --init model).
    model.json        the --init model.json plus "scst": {init, epochs_trained, best_epoch,
                      best_dev_cider_d, samples, batch_images, learning_rate, seed}.
    history.csv       epoch, sample_reward, greedy_reward (mean training CIDEr-D), loss,
                      dev_cider_d, dev_distinct_captions, dev_vocabulary_used, seconds, cpu_seconds.
Inside the checkpoint only (for resuming):
    last.keras        the model and Adam state after the last finished epoch.
    state.json        {epoch, best_epoch, best_dev_cider_d, wait, stopped_early, history}.
And settings.json: the arguments plus derived values.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from captioning.data import inputs

from captioning.models import registry

from captioning.training import scst

from captioning.data import text

from captioning.training import trainer
from captioning.data.features import load_features
from captioning.utils import (HelpFormatter, PipelineError, progress, read_json, run_cli, save_settings,
                              sha256_file)

DATA_DIR = "data"
OUTPUT_DIR = "models"
EPOCHS = 10             # upper bound; early stopping on dev CIDEr-D usually ends sooner
PATIENCE = 3            # epochs without a better dev CIDEr-D before stopping
SEED = 1
HISTORY_FIELDS = ["epoch", "sample_reward", "greedy_reward", "loss", "dev_cider_d",
                  "dev_distinct_captions", "dev_vocabulary_used", "seconds", "cpu_seconds"]
# settings that must match for a rerun to continue the run in its folder
RESUME_KEYS = ("init", "init_sha256", "features_sha256", "tokenizer_sha256", "samples",
               "batch_images", "learning_rate", "baseline", "seed")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--init", type=Path, required=True, help="train.py run folder to fine-tune")
    p.add_argument("--features", type=Path, required=True, help="features pickle the model was trained on")
    p.add_argument("--data-dir", type=Path, default=Path(DATA_DIR), help="prepare_text.py output folder")
    p.add_argument("--output-dir", type=Path, default=Path(OUTPUT_DIR), help="parent of run folders")
    p.add_argument("--name", default="", help="run folder name ('' = the --init folder's name + '-scst')")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="total SCST epochs (a rerun continues up to it)")
    p.add_argument("--samples", type=int, default=scst.SAMPLES, help="sampled captions per image per update")
    p.add_argument("--batch-images", type=int, default=scst.BATCH_IMAGES, help="images per update")
    p.add_argument("--learning-rate", type=float, default=scst.LEARNING_RATE, help="Adam")
    p.add_argument("--baseline", choices=scst.BASELINES, default=scst.BASELINE,
                   help="what a sample's CIDEr-D is compared with: the mean of the image's other "
                        "samples (Luo 2020) or the greedy caption's (Rennie et al. 2017)")
    p.add_argument("--patience", type=int, default=PATIENCE, help="early stopping on dev CIDEr-D, in epochs")
    p.add_argument("--seed", type=int, default=SEED, help="same seed, same run")
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


def load_inputs(args):
    """The --init model (sequence mode), its config and tokenizer, and the train/dev data, all
    cross-checked: one-line PipelineError for a missing or mismatched model, features or split."""
    init_dir = registry.run_folder(args.init)
    model, config, tokenizer = registry.load_captioner(init_dir, args.data_dir)
    if config.get("mode", "sequence") != "sequence":
        model = registry.rebuild_for_mode(model, config, "sequence")
        config = dict(config, mode="sequence")
    splits = text.load_splits(args.data_dir)
    descriptions = text.load_descriptions(args.data_dir / "descriptions.txt")
    references = text.load_references(args.data_dir)
    features = load_features(args.features)
    wanted = list(splits["train"]) + list(splits["dev"])
    # max_missing 0: an image of the split without features is an error, not a silent skip
    matrix, row_of_id, _ = inputs.feature_matrix(features, wanted, 0.0, str(args.features))
    del features
    if matrix.shape[1] != config["feature_dim"]:
        raise PipelineError(f"features have width {matrix.shape[1]} but model {init_dir} was trained "
                            f"on {config['feature_dim']}-d features ({args.features})")
    if config.get("features_sha256") and config["features_sha256"] != sha256_file(args.features):
        print(f"warning: {args.features} is not the features file model {init_dir} was trained on "
              f"({config.get('features_file')}); continuing, as the width matches", file=sys.stderr)
    rewards = scst.reward_references(descriptions, splits["train"], tokenizer,
                                     str(args.data_dir / "descriptions.txt"))
    return init_dir, model, config, tokenizer, splits, references, matrix, row_of_id, rewards


def dev_row(score, model, config):
    cider, words = score(model, config)
    texts = [" ".join(w) for w in words]
    return {"dev_cider_d": round(cider, 6), "dev_distinct_captions": len(set(texts)),
            "dev_vocabulary_used": len({w for ws in words for w in ws})}


def save_epoch(run_dir, model, config, state, improved, previous):
    """The state after state["epoch"] SCST epochs as one atomic checkpoint folder; returns it."""
    config["scst"].update(epochs_trained=state["epoch"], best_epoch=state["best_epoch"],
                          best_dev_cider_d=state["best_dev_cider_d"])
    return trainer.write_checkpoint(run_dir, model, state, config, improved, previous,
                                     files={"history.csv": trainer.history_csv(state["history"], HISTORY_FIELDS)})


def main(argv=None):
    args = parse_args(argv)
    for path, what in ((args.features, "features file"), (args.data_dir, "data folder")):
        if not path.exists():
            raise PipelineError(f"missing {what} {path}")
    init_dir, model, config, tokenizer, splits, references, matrix, row_of_id, rewards = load_inputs(args)
    # the folder the user named (init_dir is the checkpoint its links resolve to, which a later
    # train.py epoch replaces): it names the run and is what model.json records
    named_dir = args.init if args.init.is_dir() else args.init.parent
    run_dir = args.output_dir / (args.name or named_dir.resolve().name + "-scst")
    if run_dir.resolve() == init_dir.resolve():
        raise PipelineError(f"the output folder is the --init folder ({run_dir}); choose another --name")
    settings = {"init": str(named_dir), "init_sha256": sha256_file(init_dir / registry.MODEL_FILE),
                "features_sha256": sha256_file(args.features), "tokenizer_sha256": config["tokenizer_sha256"],
                "samples": args.samples, "batch_images": args.batch_images,
                "learning_rate": args.learning_rate, "baseline": args.baseline, "seed": args.seed}

    trainer.seed_everything(args.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = trainer.latest_checkpoint(run_dir)
    if previous is not None:
        state = read_json(previous / trainer.STATE_FILE)
        old = read_json(run_dir / "settings.json")
        for key in RESUME_KEYS:
            if old.get(key) != settings[key]:
                raise PipelineError(f"run folder holds an SCST run with another {key} ({old.get(key)!r}); "
                                    f"use another --name or remove it ({run_dir})")
        model = registry.load_keras(previous / trainer.LAST_FILE)      # weights + Adam state
        config = read_json(previous / registry.CONFIG_FILE)
        published = (registry.MODEL_FILE, registry.CONFIG_FILE, "history.csv")
        trainer.point_current(run_dir, previous, published)    # repairs what a kill left half done
        trainer.tidy(run_dir, previous, published)
        print(f"resuming {run_dir} after SCST epoch {state['epoch']}", flush=True)
    else:
        state = None
        registry.compile_model(model, args.learning_rate)    # gives the model its Adam, saved with it
        # its (zero) moments exist before the first step, so epoch 0's checkpoint saves them and
        # a resume from it loads a whole optimizer (Keras warns on a partial one)
        model.optimizer.build(model.trainable_variables)
        config = dict(config, scst=dict(settings, epochs_trained=0))
    save_settings(run_dir / "settings.json", args, **settings,
                  train_images=len(splits["train"]), dev_images=len(splits["dev"]))

    dev_ids = list(splits["dev"])
    score = scst.dev_scorer(references, dev_ids, matrix[[row_of_id[i] for i in dev_ids]], tokenizer)
    if state is None:
        row = dict(epoch=0, **dev_row(score, model, config))
        state = {"epoch": 0, "best_epoch": 0, "best_dev_cider_d": row["dev_cider_d"], "wait": 0,
                 "stopped_early": False, "history": [row]}
        previous = save_epoch(run_dir, model, config, state, True, None)
        print(f"epoch 0 (the --init model): dev CIDEr-D {row['dev_cider_d']:.4f}", flush=True)
    if state["stopped_early"] or state["epoch"] >= args.epochs:
        print(f"{run_dir}: already trained {state['epoch']} SCST epochs; nothing to do")
        return 0

    scst_trainer = scst.Trainer(model, config, tokenizer, matrix, row_of_id, splits["train"], rewards,
                           model.optimizer, args.samples, args.batch_images, args.baseline)
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        rng = np.random.default_rng([args.seed, epoch])     # per epoch: a resumed run draws the same
        stats = scst_trainer.epoch(rng, lambda it: progress(it, desc=f"SCST epoch {epoch}", unit="batch"))
        row = {"epoch": epoch, **{k: round(v, 1 if k.endswith("seconds") else 6) for k, v in stats.items()},
               **dev_row(score, model, config)}
        state["history"].append(row)
        state["epoch"] = epoch
        improved = row["dev_cider_d"] > state["best_dev_cider_d"]
        if improved:
            state.update(best_epoch=epoch, best_dev_cider_d=row["dev_cider_d"], wait=0)
        else:
            state["wait"] += 1
        state["stopped_early"] = state["wait"] >= args.patience
        previous = save_epoch(run_dir, model, config, state, improved, previous)
        print(f"SCST epoch {epoch}: reward sample {row['sample_reward']:.4f} greedy {row['greedy_reward']:.4f}  "
              f"dev CIDEr-D {row['dev_cider_d']:.4f} (best epoch {state['best_epoch']})  "
              f"{row['seconds']:.0f} s ({row['cpu_seconds']:.0f} s CPU)", flush=True)
        if state["stopped_early"]:
            break
    print(f"best dev CIDEr-D {state['best_dev_cider_d']:.4f} at SCST epoch {state['best_epoch']}; "
          f"model in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
