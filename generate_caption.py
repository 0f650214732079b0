"""Stage 5: caption photos with a trained captioner — greedy or beam search, fast.

Usage:
    python generate_caption.py photo.jpg [more.jpg | a_folder/ ...] --model models/RUN
    python generate_caption.py photos/ --model models/RUN --beam 3 --weights none
    python generate_caption.py --features data/features.pkl --ids 1000268201_693b08cb0e --model models/RUN
    python generate_caption.py photo.jpg --model models/attention --attention-map out.png
    python generate_caption.py photo.jpg --model models/A models/B     # an ensemble of two

Prints one line per image, `<name>\\t<caption>`, the caption without startseq/endseq. A missing
or corrupt image prints `error: ... (<path>)` on stderr, the other images are still captioned,
and the exit code is 1 at the end.

Reads:
    --model PATH      train.py's run folder, or its model.keras: model.keras + model.json.
                      Several (repeat, or list after one --model): an ensemble, one caption from
                      the mean of their next-word log-probabilities (docs/models.md); they must
                      share the vocabulary, and for photos the backbone.
    --data-dir DIR    prepare_text.py's tokenizer.json + meta.json (the vocabulary the model
                      was trained with; a mismatch is a one-line error).
    images            JPEG/PNG files or folders (every image in a folder, sorted), run through
                      the extractor of the model's backbone, VGG16 fc2 or Lite0, as
                      extract_features.py does (--weights imagenet|none|PATH); a model with a
                      fine-tuned top: the whole Lite0 network with that top copied in, the
                      lower part's weights those recorded in model.json (--weights unused). A model trained on
                      features of unknown origin cannot caption raw images: use --features/--ids.
    --features FILE   with --ids: caption cached features, a features.pkl ({image_id: vector})
                      or, for an attention/transformer model, the spatial grid file of
                      extract_features.py --spatial; for a model trained with a fine-tuned top
                      (train.py --finetune-top) the trunk file of extract_features.py --trunk
                      (its grids: that top's output on the cached maps). Several files for an ensemble of pooled,
                      grid and fine-tuned models: each model reads the first of its kind that fits it.
    --consensus FILE  optional: each caption chosen from the beam's finished ones (--beam,
                      default 5 here) by agreement with the captions of the image's nearest
                      training images (captioning/inference/consensus.py, docs/models.md). FILE:
                      a pooled features pickle holding the training images (with --ids, those
                      images too); photos are embedded by the backbone FILE records, else the
                      model's. --consensus-data DIR: the prepare_text.py folder whose
                      splits.json and descriptions.txt give the training images' captions.
Writes: nothing but stdout, except with --attention-map OUT.png (attention/transformer models):
    a PNG per image, one panel per word: the picture lit where the model looked while choosing
    that word (captioning/inference/attention_maps.py). One image: OUT.png; several: OUT-<name>.png each.
    Cached features (--ids) have no picture: their panels light a grey square.

Decoding: captioning/inference/decoding.py; the model with its vocabulary: captioning/inference/captioner.py.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from captioning.inference import attention_maps, consensus, decoding, ensemble
from captioning.inference.captioner import DATA_DIR, PRETRAINED_DIR, WEIGHTS
from captioning.inference.decoding import ALPHA, BEAM
from captioning.data.images import expand_paths, open_rgb
from captioning.models.finetune import file_ids
from captioning.utils import HelpFormatter, PipelineError, atomic_write, run_cli

MODEL_DIR = PRETRAINED_DIR  # the shipped captioner
CONSENSUS_DATA = "data"     # prepare_text.py's folder, as in README's commands
IMAGES_PER_CHUNK = 64    # images decoded and captioned together (bounds memory for big folders)


def generate_caption(model, tokenizer, photo, max_length, beam=BEAM, alpha=ALPHA, variant="merge"):
    """The course's function: one feature vector -> caption string (no startseq/endseq)."""
    config = {"variant": variant, "max_length": max_length, "feature_dim": np.size(photo)}
    ids = decoding.caption_features(model, config, tokenizer, np.reshape(photo, (1, -1)), beam, alpha)[0]
    id_to_word, _, end_id, _ = decoding.vocabulary(tokenizer)
    return " ".join(decoding.ids_to_words(id_to_word, ids, end_id))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("images", nargs="*", help="image files or folders")
    parser.add_argument("--model", nargs="+", action="extend", default=None,
                        help="train.py run folder, or its model.keras; several = an ensemble "
                             "(default: the shipped pretrained/attention-lite0-ft-scst)")
    parser.add_argument("--data-dir", default=DATA_DIR,
                        help="prepare_text.py output folder (default: the tokenizer in the model "
                             "folder, else the data_dir recorded in model.json)")
    parser.add_argument("--beam", type=int, default=None,
                        help=f"beam width (1 = greedy; default {BEAM}, {consensus.BEAM} with --consensus)")
    parser.add_argument("--alpha", type=float, default=ALPHA,
                        help="beam length normalisation exponent, for --beam >= 2 only "
                             "(beam 1 is the plain argmax loop)")
    parser.add_argument("--weights", default=WEIGHTS, help="VGG16 weights: imagenet | none | PATH")
    parser.add_argument("--features", nargs="+", action="extend", default=None,
                        help="cached features.pkl (use with --ids); several for an ensemble")
    parser.add_argument("--ids", nargs="*", default=[], help="image ids to caption from --features")
    parser.add_argument("--attention-map", type=Path, default=None, metavar="OUT.png",
                        help="write each image's per-word attention panels (grid models)")
    consensus.add_options(parser)
    parser.add_argument("--consensus-data", default=CONSENSUS_DATA, metavar="DIR",
                        help="prepare_text.py folder of the training captions (--consensus)")
    args = parser.parse_args(argv)
    args.model = args.model or [MODEL_DIR]
    consensus.check_options(parser, args, BEAM)
    if not args.images and not args.ids:
        parser.error("give image files/folders, or --features FILE --ids ID ...")
    if args.ids and not args.features:
        parser.error("--ids needs --features")
    if args.attention_map and len(args.model) > 1:
        parser.error("--attention-map shows one model's attention: give one --model")
    return args


def report(failures):
    for where, reason in failures:
        print(f"error: {reason} ({where})", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    # the user's own inputs are checked first: a missing photo is reported as such even
    # when the model or the data folder is missing too
    failures, found = [], []
    if args.ids:      # pooled pickles, spatial grid or trunk files, whichever each model reads
        found = list(args.ids)
        for path in args.features:
            in_file = set(file_ids(path, args.ids))
            failures += [(i, f"id not in {path}") for i in args.ids if i not in in_file]
            found = [i for i in found if i in in_file]
    paths, missing = expand_paths(args.images)
    failures += missing
    report(failures)
    if not found and not paths:
        return 1
    ensembled = len(args.model) > 1
    reranker = consensus.from_options(args, args.consensus_data)
    captioner = ensemble.load_captioner(args.model, args.data_dir)
    if not ensembled:
        captioner.encode = captioner.default_encoder(args.weights)   # the model's own backbone
    if args.attention_map and not captioner.config.get("grid"):
        raise PipelineError(f"--attention-map needs an attention or transformer model, not "
                            f"{captioner.config.get('variant')} ({captioner.run_dir})")
    many = len(found) + len(paths) > 1
    if found:         # a fine-tuned model's grids: its top over a trunk file's maps
        inputs, _ = ensemble.member_features(captioner.members if ensembled else [captioner],
                                             args.features, args.model,
                                             lambda member, path: member.read_features(path, found)[1])
        caption_and_map(captioner, found, [None] * len(found), inputs if ensembled else inputs[0],
                        args, many, reranker, reranker.query_vectors(found) if reranker else None, found)
    if paths:
        try:
            if ensembled:
                captioner.encoders(args.weights)       # one per kind of input; same backbone
            else:
                captioner.check_encoder()
        except PipelineError as exc:
            raise PipelineError(f"{exc}; caption cached features of the same kind with "
                                f"--features FILE --ids ID ... instead") from None
        model_backbone = (captioner.members[0] if ensembled else captioner).backbone
        query_encoder = consensus.photo_encoder(reranker, model_backbone, args.weights) if reranker else None
    for start in range(0, len(paths), IMAGES_PER_CHUNK):
        names, images = [], []
        for path in paths[start:start + IMAGES_PER_CHUNK]:
            try:
                images.append(open_rgb(path))
                names.append(str(path))
            except PipelineError as exc:
                report([(path, str(exc))])
                failures.append((path, str(exc)))
        if images:
            queries = np.asarray(query_encoder(images), np.float32) if reranker else None
            caption_and_map(captioner, names, images, captioner.encode_images(images), args, many,
                            reranker, queries)
    return 1 if failures else 0


def map_path(out, name, many):
    """OUT.png for one image; OUT-<image name>.png when there are several."""
    return out.with_name(f"{out.stem}-{Path(name).stem}{out.suffix}") if many else out


def caption_and_map(captioner, names, pictures, features, args, many, reranker=None, queries=None,
                    ids=None):
    """Print `name<TAB>caption` per image; with --attention-map also write its panels. With a
    reranker, each caption is chosen from the beam's by consensus (queries: the images' vectors
    for it; ids: their image ids, if known)."""
    if reranker is None:
        id_lists = captioner.caption_ids(features, args.beam, args.alpha)
    else:
        id_lists = consensus.caption_ids(captioner, features, reranker, queries, args.beam, args.alpha, ids)[0]
    maps = captioner.attention_maps(features, id_lists) if args.attention_map else None
    for k, (name, ids) in enumerate(zip(names, id_lists)):
        words = captioner.words(ids)
        print(f"{name}\t{' '.join(words)}")
        if maps is not None:
            sheet = attention_maps.word_panels(pictures[k], words, maps[k])
            with atomic_write(map_path(args.attention_map, name, many), "wb") as handle:
                handle.write(attention_maps.png_bytes(sheet))


if __name__ == "__main__":
    sys.exit(run_cli(main))
