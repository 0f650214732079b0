"""Consensus re-ranking: choose among a beam's finished captions by how much they agree with
the captions of the image's nearest training images (Devlin et al. 2015, "Language Models for
Image Captioning: The Quirks and What Works"; Mao et al. 2015's m-RNN re-ranking).

Owns
  Consensus        the training side: every training image's pooled vector (L2-normalised)
                   and its cleaned captions as CIDEr-D references (document frequencies over
                   the training images). For a query vector it finds the K nearest training
                   images by cosine; a candidate caption's consensus is the mean over those K
                   of its CIDEr-D against each one's captions.
  Consensus.choose each image's pick from its n-best list (decoding.beam_search with
                   candidates=True): the argmax of W * z(model score) + (1 - W) * z(consensus),
                   z standardising over the image's candidates. W 1 keeps the model's choice;
                   a list of one candidate keeps it at any W.
  caption_ids      a Captioner's or an Ensemble's n-best lists, then the choice: what
                   evaluate_bleu.py and generate_caption.py decode with --consensus.
  photo_encoder    new photos' query vectors: the pooled encoder of the backbone the features
                   file records (else the captioner's), as extract_features.py computes them.
  add_options, check_options, from_options   the scripts' --consensus options.
Reads a features pickle (pooled vectors of the training images and of the images to caption,
with the restricted unpickler) and prepare_text.py's descriptions.txt and splits.json.

Why: CIDEr-D rewards what most people say about an image; the neighbours' captions estimate
that for an unseen image, and the beam's alternatives often contain a more typical phrasing
than its top-scored one. K and W were chosen on the dev split (docs/results.md).
"""
from pathlib import Path

import numpy as np

from captioning.data import text
from captioning.data.features import file_backbone, load_features
from captioning.evaluation.coco_metrics import CiderD
from captioning.inference.captioner import WEIGHTS, backbone_encoder
from captioning.utils import PipelineError

K = 20          # nearest training images whose captions vote (dev: 10-60 all help; 20 best)
WEIGHT = 0.5    # W: the model score's share of the combined score
BEAM = 5        # the beam that supplies the candidates (dev: 5 gave more useful ones than 3)


class Consensus:
    """vectors: {image_id: (D,) pooled vector}, at least every training image's; captions:
    {image_id: [cleaned caption, ...]}; train_ids: the images whose captions vote."""

    def __init__(self, vectors, captions, train_ids, k=K, weight=WEIGHT, source="the vectors",
                 backbone=None):
        if k < 1:
            raise PipelineError(f"consensus needs at least one neighbour (k {k})")
        if not 0.0 <= weight <= 1.0:
            raise PipelineError(f"the consensus weight must be between 0 and 1 (got {weight})")
        train_ids = [i for i in train_ids if captions.get(i)]
        missing = [i for i in train_ids if i not in vectors]
        if missing:
            raise PipelineError(f"training image {missing[0]} has no vector in {source} "
                                f"({len(missing)} of {len(train_ids)} missing)")
        if not train_ids:
            raise PipelineError("consensus needs training images with captions; none found")
        self.vectors, self.source, self.backbone = vectors, source, backbone
        self.k, self.weight = min(k, len(train_ids)), weight
        self.train_ids = train_ids
        self.row_of = {image_id: row for row, image_id in enumerate(train_ids)}
        self.train = self._normalised(np.stack([vectors[i] for i in train_ids]))
        self.cider = CiderD({i: [c.split() for c in captions[i]] for i in train_ids})

    @classmethod
    def from_files(cls, features, data_dir, k=K, weight=WEIGHT):
        """The training side from a features pickle and prepare_text.py's folder (backbone:
        the one the file records, else None)."""
        data_dir = Path(data_dir)
        return cls(load_features(features), text.load_descriptions(data_dir / "descriptions.txt"),
                   list(text.load_splits(data_dir)["train"]), k, weight, str(features),
                   file_backbone(features))

    @staticmethod
    def _normalised(matrix):
        matrix = np.asarray(matrix, np.float64)
        return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)

    def query_vectors(self, ids):
        """(N, D) vectors of images `ids` from the features the training side came from; a
        missing one is a PipelineError naming it."""
        missing = [i for i in ids if i not in self.vectors]
        if missing:
            raise PipelineError(f"image {missing[0]} has no vector in {self.source} "
                                f"({len(missing)} of {len(ids)} missing)")
        return np.stack([self.vectors[i] for i in ids])

    def neighbours(self, queries, ids=None):
        """(N, D) query vectors -> (N, k) rows of train_ids, nearest first (cosine). ids: the
        queries' image ids, if known: a training image never votes for its own captions."""
        queries = self._normalised(queries)
        if queries.shape[1] != self.train.shape[1]:
            raise PipelineError(f"query vectors are {queries.shape[1]}-d but {self.source} holds "
                                f"{self.train.shape[1]}-d vectors")
        similarity = queries @ self.train.T
        for q, image_id in enumerate(() if ids is None else ids):
            if image_id in self.row_of:
                similarity[q, self.row_of[image_id]] = -np.inf
        top = np.argpartition(-similarity, self.k - 1, axis=1)[:, :self.k]
        order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1)

    def agreement(self, words, rows):
        """(C,) consensus of C candidate captions (word lists) with the training images at
        `rows`: the mean over those images of CIDEr-D against each one's captions."""
        voters = [self.train_ids[r] for r in rows]
        return np.array([self.cider.scores(voters, [list(w)] * len(voters)).mean() for w in words])

    def choose(self, queries, candidates, ids=None):
        """queries (N, D); candidates: N lists [(words, model score)], best model score first;
        ids: the queries' image ids, if known (neighbours) -> (N picks as indices into each
        list, N consensus arrays)."""
        if len(queries) != len(candidates):
            raise PipelineError(f"{len(queries)} query vectors for {len(candidates)} candidate lists")
        picks, agreements = [], []
        for rows, options in zip(self.neighbours(queries, ids), candidates):
            agree = self.agreement([w for w, _ in options], rows)
            model = np.array([s for _, s in options], np.float64)
            combined = self.weight * _z(model) + (1.0 - self.weight) * _z(agree)
            picks.append(int(np.argmax(combined)))      # ties: the first, the model's order
            agreements.append(agree)
        return picks, agreements


def add_options(parser):
    """--consensus, --consensus-k and --consensus-weight: evaluate_bleu.py's and
    generate_caption.py's (their --beam must default to None: check_options fills it)."""
    parser.add_argument("--consensus", default=None, metavar="FEATURES",
                        help="re-rank each beam's captions by agreement with the nearest training "
                             "images' captions, found in this pooled features pickle")
    parser.add_argument("--consensus-k", type=int, default=K,
                        help="training images whose captions vote (--consensus)")
    parser.add_argument("--consensus-weight", type=float, default=WEIGHT,
                        help="W: the model score's share, 0..1 (--consensus; 1 = the beam's own choice)")


def check_options(parser, args, beam):
    """args.beam: `beam` unless given, BEAM with --consensus; then parser.error (exit 2) for a
    beam below 1, greedy with --consensus, or a K or W out of range."""
    if args.beam is None:
        args.beam = BEAM if args.consensus else beam
    if args.beam < 1:
        parser.error("--beam must be >= 1")
    if args.consensus and args.beam < 2:
        parser.error("--consensus chooses among a beam's captions: give --beam 2 or more")
    if args.consensus_k < 1:
        parser.error("--consensus-k must be >= 1")
    if not 0.0 <= args.consensus_weight <= 1.0:
        parser.error("--consensus-weight must be between 0 and 1")


def from_options(args, data_dir):
    """The scripts' Consensus from --consensus, --consensus-k and --consensus-weight and the
    prepare_text.py folder `data_dir`; None without --consensus."""
    if not args.consensus:
        return None
    return Consensus.from_files(args.consensus, data_dir, args.consensus_k, args.consensus_weight)


def caption_ids(captioner, features, reranker, queries, beam, alpha, ids=None, progress=False):
    """captioner: a Captioner, or an Ensemble with one feature array per member; queries: the
    images' (N, D) vectors for `reranker`; ids: their image ids, if known -> (N chosen id
    lists, N n-best lists [(ids, score)], N picks)."""
    if beam < 2:
        raise PipelineError(f"consensus re-ranking chooses among a beam's captions: it needs beam >= 2 (got {beam})")
    n_best = captioner.caption_ids(features, beam, alpha, progress=progress, candidates=True)
    picks, _ = reranker.choose(queries, [[(captioner.words(c), score) for c, score in options]
                                         for options in n_best], ids)
    return [options[pick][0] for options, pick in zip(n_best, picks)], n_best, picks


def photo_encoder(reranker, model_backbone, weights=WEIGHTS):
    """PIL images -> (N, D) query vectors: the pooled encoder of the backbone the reranker's
    file records, else of `model_backbone` (the captioner's); its width must be the file's."""
    backbone = reranker.backbone or model_backbone
    if not backbone or backbone == "unknown":
        raise PipelineError(f"{reranker.source} records no backbone and the model's is unknown: "
                            f"cannot embed photos for consensus re-ranking")
    encoder = backbone_encoder(backbone, weights, "pooled")
    width = getattr(encoder, "width", None)
    if width is not None and width != reranker.train.shape[1]:
        raise PipelineError(f"the {backbone} encoder gives {width}-d vectors but {reranker.source} "
                            f"holds {reranker.train.shape[1]}-d ones")
    return encoder


def _z(values):
    """Standardised over one image's candidates; 0 where they are all equal (or one)."""
    finite = np.where(np.isfinite(values), values, np.nan)
    if np.all(np.isnan(finite)):
        return np.zeros(len(values))
    finite = np.where(np.isnan(finite), np.nanmin(finite), finite)
    spread = finite.std()
    return np.zeros(len(values)) if spread == 0 else (finite - finite.mean()) / spread
