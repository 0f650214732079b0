"""One self-critical training run (train_scst.py): inputs, the run folder, the epoch loop.

Owns
  load_inputs   the --init model (in sequence mode), its config and tokenizer, the train/dev
                splits, references, feature matrix and reward references, all cross-checked.
  train_run     SCST epochs (captioning.training.scst.Trainer) in a run folder
                (captioning.training.run_folder): epoch 0 is the --init model itself, scored on
                dev; after every epoch a history row, the selection by dev CIDEr-D, patience,
                then one atomic checkpoint. A rerun resumes after the last finished epoch.
Files of the run folder: train_scst.py's docstring. TensorFlow is imported inside functions.
"""
import sys

import numpy as np

from captioning.data import inputs, text
from captioning.models import registry
from captioning.training import scst
from captioning.training.run_folder import LAST_FILE, RunFolder, Selection
from captioning.training.trainer import seed_everything
from captioning.utils import PipelineError, progress, read_json, sha256_file

EPOCHS = 10             # upper bound; early stopping on dev CIDEr-D usually ends sooner
PATIENCE = 3            # epochs without a better dev CIDEr-D before stopping
SEED = 1
HISTORY_FIELDS = ["epoch", "sample_reward", "greedy_reward", "loss", "dev_cider_d",
                  "dev_distinct_captions", "dev_vocabulary_used", "seconds", "cpu_seconds"]


def load_inputs(args):
    """(init_dir, model, config, tokenizer, splits, references, matrix, row_of_id, rewards) of
    train_scst.py's namespace; one-line PipelineError for a missing or mismatched model,
    features or split. init_dir is the checkpoint folder the --init links resolve to."""
    init_dir = registry.run_folder(args.init)
    model, config, tokenizer = registry.load_captioner(init_dir, args.data_dir)
    if config.get("mode", "sequence") != "sequence":
        model = registry.rebuild_for_mode(model, config, "sequence")
        config = dict(config, mode="sequence")
    splits = text.load_splits(args.data_dir)
    descriptions = text.load_descriptions(args.data_dir / "descriptions.txt")
    references = text.load_references(args.data_dir)
    wanted = list(splits["train"]) + list(splits["dev"])
    # max_missing 0: an image of the split without features is an error, not a silent skip
    matrix, row_of_id, _ = inputs.pooled_rows(args.features, wanted, 0.0)
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
    """The dev half of a history row: CIDEr-D of the greedy captions, how many differ, words used."""
    cider, words = score(model, config)
    texts = [" ".join(w) for w in words]
    return {"dev_cider_d": round(cider, 6), "dev_distinct_captions": len(set(texts)),
            "dev_vocabulary_used": len({w for ws in words for w in ws})}


def save_epoch(folder, model, config, state, row):
    """Record one epoch's row (selection by dev CIDEr-D, patience), then its checkpoint, with
    model.json's "scst" block describing the run so far."""
    improved = folder.record(state, row, row["dev_cider_d"])
    config["scst"].update(epochs_trained=state["epoch"], best_epoch=state["best_epoch"],
                          best_dev_cider_d=state["best_dev_cider_d"])
    folder.save(model, state, config, improved)


def train_run(args):
    """Run (or resume) SCST as train_scst.py's namespace says. Returns (run folder, final state),
    state None where the folder's run had already finished (nothing to do)."""
    init_dir, model, config, tokenizer, splits, references, matrix, row_of_id, rewards = load_inputs(args)
    # the folder the user named (init_dir is the checkpoint its links resolve to, which a later
    # train.py epoch replaces): it names the run and is what model.json records
    named_dir = args.init if args.init.is_dir() else args.init.parent
    run_dir = args.output_dir / (args.name or named_dir.resolve().name + "-scst")
    if run_dir.resolve() == init_dir.resolve():
        raise PipelineError(f"the output folder is the --init folder ({run_dir}); choose another --name")
    # the settings a rerun must match to continue the run in its folder
    settings = {"init": str(named_dir), "init_sha256": sha256_file(init_dir / registry.MODEL_FILE),
                "features_sha256": sha256_file(args.features), "tokenizer_sha256": config["tokenizer_sha256"],
                "samples": args.samples, "batch_images": args.batch_images,
                "learning_rate": args.learning_rate, "baseline": args.baseline, "seed": args.seed}

    seed_everything(args.seed)
    folder = RunFolder(run_dir, Selection("best_dev_cider_d", higher=True, patience=args.patience),
                       HISTORY_FIELDS, what="an SCST run")
    state = folder.resume(settings)
    if state is not None:
        model = registry.load_keras(folder.checkpoint / LAST_FILE)      # weights + Adam state
        config = read_json(folder.checkpoint / registry.CONFIG_FILE)
        print(f"resuming {run_dir} after SCST epoch {state['epoch']}", flush=True)
    else:
        registry.compile_model(model, args.learning_rate)    # gives the model its Adam, saved with it
        # its (zero) moments exist before the first step, so epoch 0's checkpoint saves them and
        # a resume from it loads a whole optimizer (Keras warns on a partial one)
        model.optimizer.build(model.trainable_variables)
        config = dict(config, scst=dict(settings, epochs_trained=0))
    folder.write_settings(args, **settings, train_images=len(splits["train"]), dev_images=len(splits["dev"]))

    dev_ids = list(splits["dev"])
    score = scst.dev_scorer(references, dev_ids, matrix[[row_of_id[i] for i in dev_ids]], tokenizer)
    if state is None:
        state = folder.new_state()
        row = dict(epoch=0, **dev_row(score, model, config))
        save_epoch(folder, model, config, state, row)
        print(f"epoch 0 (the --init model): dev CIDEr-D {row['dev_cider_d']:.4f}", flush=True)
    if folder.finished(state, args.epochs):
        print(f"{run_dir}: already trained {state['epoch']} SCST epochs; nothing to do")
        return run_dir, None

    scst_trainer = scst.Trainer(model, config, tokenizer, matrix, row_of_id, splits["train"], rewards,
                                model.optimizer, args.samples, args.batch_images, args.baseline)
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        rng = np.random.default_rng([args.seed, epoch])     # per epoch: a resumed run draws the same
        stats = scst_trainer.epoch(rng, lambda it: progress(it, desc=f"SCST epoch {epoch}", unit="batch"))
        row = {"epoch": epoch, **{k: round(v, 1 if k.endswith("seconds") else 6) for k, v in stats.items()},
               **dev_row(score, model, config)}
        save_epoch(folder, model, config, state, row)
        print(f"SCST epoch {epoch}: reward sample {row['sample_reward']:.4f} greedy {row['greedy_reward']:.4f}  "
              f"dev CIDEr-D {row['dev_cider_d']:.4f} (best epoch {state['best_epoch']})  "
              f"{row['seconds']:.0f} s ({row['cpu_seconds']:.0f} s CPU)", flush=True)
        if state["stopped_early"]:
            break
    return run_dir, state

