"""Text -> image re-ranking: the embedding proposes, a captioner re-orders its top K.

Owns: the candidate set of each caption (candidates), the combined score and the resulting
ranks (text_to_image_ranks). numpy only; reads and writes no files. The captioner's scores of
the candidate pairs come from captioning/retrieval/caption_scoring.py (pair_scores);
captioning/retrieval/protocol.py wires the two together for evaluate_retrieval.py.

For each caption, its K best images by embedding cosine are re-scored by

    combined = W * z(cosine) + (1 - W) * z(log-likelihood)

where the log-likelihood is the caption's length-normalised log-likelihood given the image
(the captioner as a ranker) and z() standardises a score over the caption's K candidates
(mean 0, standard deviation 1; all zeros where the K values are equal). The z-scores put the
two scores on one unitless scale, so W is a share: W = 1 is the embedding alone, W = 0 the
captioner alone within the K. The K candidates are ordered by `combined`; every image outside
them keeps its embedding order below them, so re-ranking moves images only inside the top K,
and recall at K or above does not change.

Ties follow the protocol's rule (captioning/retrieval/ranking.py): a tie counts in favour of the
correct image. Among images of equal cosine, the caption's own image is taken into the top K
first, and equal combined scores leave it ahead. That makes W = 1 and K = 1 give exactly the
plain ranks, ties included.
"""
import numpy as np

from captioning.retrieval import ranking


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


def text_to_image_ranks(cosine, caption_image, rows, likelihood, weight):
    """Rank of its own image for every caption after re-ranking: int array (captions,).

    cosine: (images, captions) embedding scores; rows: candidates(); likelihood: (K, captions)
    the captioner's score of the pair (rows[k, j], caption j). Only the columns of captions
    whose own image is among the candidates are read (the others keep their plain rank), so
    the rest may hold NaN.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    cosine = np.asarray(cosine, np.float64)
    rows = np.asarray(rows, np.int64)
    likelihood = np.asarray(likelihood, np.float64)
    if likelihood.shape != rows.shape:
        raise ValueError(f"likelihood {likelihood.shape} must match the candidates {rows.shape}")
    caption_image = np.asarray(caption_image, np.int64)
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
