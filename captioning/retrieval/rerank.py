"""Re-ranking in both directions: the embedding proposes, a captioner re-orders its top K.

Owns: the candidate sets (candidates: each caption's K images; caption_candidates: each
image's K captions), the caption prior and pointwise mutual information (caption_prior,
pointwise_mi), the combined score and the resulting ranks (text_to_image_ranks,
image_to_text_ranks). numpy only; reads and writes no files. The captioner's scores of the
candidate pairs come from captioning/retrieval/caption_scoring.py (pair_scores);
captioning/retrieval/protocol.py wires the two together for evaluate_retrieval.py.

Text -> image: for each caption, its K best images by embedding cosine are re-scored by

    combined = W * z(cosine) + (1 - W) * z(log-likelihood)

where the log-likelihood is the caption's length-normalised log-likelihood given the image
(the captioner as a ranker) and z() standardises a score over the K candidates (mean 0,
standard deviation 1; all zeros where the K values are equal). The z-scores put the two scores
on one unitless scale, so W is a share: W = 1 is the embedding alone, W = 0 the captioner
alone within the K. The K candidates are ordered by `combined`; every item outside them keeps
its embedding order below them, so re-ranking moves items only inside the top K, and recall at
K or above does not change.

Image -> text: for one image the likelihood compares captions, and short, common captions are
likely under every image, so it ranks annotations poorly. Each of the image's K best captions
is scored instead by the pointwise mutual information

    PMI(i, c) = log p(c | i) - log sum_{i'} p(c | i')

with total (not length-normalised) log-likelihoods, the sum running over the caption's own K
candidate images of the text -> image pass (the images that hold nearly all of it). That is
the log-posterior of the image given the caption under a uniform prior: how much more likely
the caption is under this image than under the images that resemble it. It enters `combined`
in the log-likelihood's place, with the same W.

Ties follow the protocol's rule (captioning/retrieval/ranking.py): a tie counts in favour of the
correct item. Among items of equal cosine, the correct ones are taken into the top K first, and
equal combined scores leave them ahead. That makes W = 1 and K = 1 give exactly the plain
ranks, ties included.
"""
import numpy as np

from captioning.retrieval import ranking

TOP_K = 50     # candidates per query that the captioner re-orders; the cost grows linearly with it
WEIGHT = 0.3   # W, the embedding's share. K 50 and W 0.3 were the best on the Lite0 dev split
               # in both directions (docs/results.md)


def candidates(cosine, caption_image, top_k):
    """(K, captions) int array: each caption's top-K image rows by cosine, best first.

    cosine: (images, captions). Equal cosines put the caption's own image first, then lower
    rows; K is cut to the number of images. The own image is at row (plain rank - 1) of its
    column whenever its plain text -> image rank is at most K.
    """
    cosine = np.asarray(cosine, np.float64)
    caption_image = np.asarray(caption_image, np.int64)
    n_images, n_captions = cosine.shape
    k = max(1, min(int(top_k), n_images))
    row = np.broadcast_to(np.arange(n_images)[:, None], cosine.shape)
    not_own = row != caption_image[None, :]
    # lexsort: the last key is the primary one; each column is sorted on its own
    order = np.lexsort((row, not_own, -cosine), axis=0)
    return order[:k]


def zscore(values):
    """Standardise each column of (K, n) over its K rows; a column of equal values -> zeros."""
    values = np.asarray(values, np.float64)
    centred = values - values.mean(axis=0, keepdims=True)
    spread = values.std(axis=0, keepdims=True)
    return np.divide(centred, spread, out=np.zeros_like(centred), where=spread > 0)


def combine(cosine, likelihood, weight):
    """W * z(cosine) + (1 - W) * z(log-likelihood), both (K, n) over the same candidates."""
    return weight * zscore(cosine) + (1.0 - weight) * zscore(likelihood)


def movable(cosine, caption_image, top_k):
    """Captions whose own image is among their top K (the only ones re-ranking can move), and
    the plain text -> image ranks of all captions."""
    plain = ranking.text_to_image_ranks(cosine, caption_image)
    return np.nonzero(plain <= min(int(top_k), np.shape(cosine)[0]))[0], plain


def _arrays(weight, cosine, candidates, score, caption_image):
    """The ranks' inputs as float64 / int64 arrays; ValueError for a weight outside [0, 1] or a
    score of another shape than its candidates."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    candidates, score = np.asarray(candidates, np.int64), np.asarray(score, np.float64)
    if score.shape != candidates.shape:
        raise ValueError(f"scores {score.shape} must match the candidates {candidates.shape}")
    return np.asarray(cosine, np.float64), candidates, score, np.asarray(caption_image, np.int64)


def text_to_image_ranks(cosine, caption_image, rows, likelihood, weight):
    """Rank of its own image for every caption after re-ranking: int array (captions,).

    cosine: (images, captions) embedding scores; rows: candidates(); likelihood: (K, captions)
    the captioner's score of the pair (rows[k, j], caption j). Only the columns of captions
    whose own image is among the candidates are read (the others keep their plain rank), so
    the rest may hold NaN.
    """
    cosine, rows, likelihood, caption_image = _arrays(weight, cosine, rows, likelihood, caption_image)
    cols, plain = movable(cosine, caption_image, rows.shape[0])
    ranks = plain.copy()
    if not cols.size:
        return ranks
    own_at = plain[cols] - 1
    if not np.array_equal(rows[own_at, cols], caption_image[cols]):
        raise ValueError("rows are not candidates() of this cosine matrix")
    combined = combine(np.take_along_axis(cosine, rows, axis=0)[:, cols], likelihood[:, cols], weight)
    own = combined[own_at, np.arange(len(cols))]
    ranks[cols] = 1 + (combined > own[None, :]).sum(axis=0)
    return ranks


def caption_candidates(cosine, caption_image, top_k):
    """(images, K) int array: each image's top-K caption columns by cosine, best first.

    Equal cosines put the image's own captions first, then lower columns; K is cut to the
    number of captions. An own caption is at column (plain image -> text rank - 1) of the
    image's row whenever that rank is at most K.
    """
    cosine = np.asarray(cosine, np.float64)
    caption_image = np.asarray(caption_image, np.int64)
    n_images, n_captions = cosine.shape
    k = max(1, min(int(top_k), n_captions))
    col = np.broadcast_to(np.arange(n_captions)[None, :], cosine.shape)
    not_own = caption_image[None, :] != np.arange(n_images)[:, None]
    return np.lexsort((col, not_own, -cosine), axis=1)[:, :k]


def caption_prior(total):
    """(captions,) log sum_i p(c | i) over each caption's candidate images.

    total: (K, captions) total log-likelihoods of the pairs (candidates()[k, j], caption j).
    """
    return np.logaddexp.reduce(np.asarray(total, np.float64), axis=0)


def pointwise_mi(total, prior, cols):
    """(images, K) PMI(i, c) = total log-likelihood of (i, cols[i, k]) - prior[cols[i, k]]."""
    return np.asarray(total, np.float64) - np.asarray(prior, np.float64)[np.asarray(cols, np.int64)]


def image_to_text_ranks(cosine, caption_image, cols, score, weight):
    """Rank of the best-placed own caption for every image after re-ranking: int array (images,).

    cosine: (images, captions) embedding scores; cols: caption_candidates(); score: (images, K)
    the captioner's score of the pair (image i, caption cols[i, k]) (pointwise_mi). Images with
    no own caption among their K keep their plain rank.
    """
    cosine, cols, score, caption_image = _arrays(weight, cosine, cols, score, caption_image)
    plain = ranking.image_to_text_ranks(cosine, caption_image)
    own = caption_image[cols] == np.arange(len(cols))[:, None]
    movable = own.any(axis=1)
    inside = (plain >= 1) & (plain <= cols.shape[1])
    if not np.array_equal(movable, inside) or not own[inside, plain[inside] - 1].all():
        raise ValueError("cols are not caption_candidates() of this cosine matrix")
    ranks = plain.copy()
    if not movable.any():
        return ranks
    combined = combine(np.take_along_axis(cosine, cols, axis=1).T, score.T, weight).T   # (images, K)
    best = np.where(own, combined, -np.inf).max(axis=1)
    ranks[movable] = 1 + (combined > best[:, None]).sum(axis=1)[movable]
    return ranks
