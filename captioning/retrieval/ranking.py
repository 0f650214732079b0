"""Ranking metrics of the image-sentence retrieval protocol (Hodosh et al. 2013), numpy only.

Owns: the ranks of the two directions and their summary (R@1/5/10, median and mean rank).
Reads and writes no files.

The protocol on Flickr8k's test split scores every (image, sentence) pair of 1000 images and
their 5000 captions:
  image annotation (image -> text): for each image, the rank of the FIRST of its correct
      captions among all captions;
  image search (text -> image): for each caption, the rank of its image among all images.
Ranks are 1-based (1 = the best match comes first). A tie with the correct item counts in its
favour: rank = 1 + the number of items scored strictly higher. Recall at K is the share of
queries (percent) whose rank is <= K. The median rank is numpy's median (x.5 for an even
count of queries with two different middle ranks); papers usually print an integer.
"""
import numpy as np

RECALL_AT = (1, 5, 10)


def _check(similarity, caption_image):
    similarity = np.asarray(similarity)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    if similarity.ndim != 2 or caption_image.shape != (similarity.shape[1],):
        raise ValueError(f"similarity must be (images, captions) and caption_image (captions,); "
                         f"got {similarity.shape} and {caption_image.shape}")
    if caption_image.size and (caption_image.min() < 0 or caption_image.max() >= similarity.shape[0]):
        raise ValueError("caption_image holds an image index outside the similarity matrix")
    return similarity, caption_image


def image_to_text_ranks(similarity, caption_image):
    """Rank of the best-placed correct caption for every image: int array (images,).

    similarity: (images, captions), higher = better match. caption_image[j]: the row of
    caption j's image. An image without captions gets rank 0 (no correct answer exists).
    """
    similarity, caption_image = _check(similarity, caption_image)
    n_images = similarity.shape[0]
    # best score among each image's own captions (-inf where an image has none)
    best = np.full(n_images, -np.inf, dtype=np.float64)
    np.maximum.at(best, caption_image, similarity[caption_image, np.arange(len(caption_image))])
    ranks = 1 + (similarity > best[:, None]).sum(axis=1)
    ranks[np.isneginf(best)] = 0
    return ranks.astype(np.int64)


def text_to_image_ranks(similarity, caption_image):
    """Rank of its own image for every caption: int array (captions,)."""
    similarity, caption_image = _check(similarity, caption_image)
    own = similarity[caption_image, np.arange(len(caption_image))]
    return (1 + (similarity > own[None, :]).sum(axis=0)).astype(np.int64)


def summarize(ranks, recall_at=RECALL_AT):
    """{"r1", "r5", "r10" (percent), "median_rank", "mean_rank", "queries"} of 1-based ranks.

    Queries without a correct answer (rank 0) are left out.
    """
    ranks = np.asarray(ranks)
    ranks = ranks[ranks > 0]
    if not ranks.size:
        raise ValueError("no ranked queries")
    out = {f"r{k}": float(100.0 * np.mean(ranks <= k)) for k in recall_at}
    out.update(median_rank=float(np.median(ranks)), mean_rank=float(np.mean(ranks)),
               queries=int(ranks.size))
    return out


def evaluate(similarity, caption_image):
    """Both directions and their rsum (R@1+R@5+R@10 of both, the usual model-selection score)."""
    annotation = summarize(image_to_text_ranks(similarity, caption_image))
    search = summarize(text_to_image_ranks(similarity, caption_image))
    rsum = sum(d[f"r{k}"] for d in (annotation, search) for k in RECALL_AT)
    return {"image_to_text": annotation, "text_to_image": search, "rsum": float(rsum)}


def format_table(rows):
    """rows: [(label, evaluate() dict)] -> a plain-text table, one line per row."""
    head = (f"{'ranker':<38} {'annotation R@1/5/10':>21} {'med':>5} {'mean':>7}   "
            f"{'search R@1/5/10':>17} {'med':>5} {'mean':>7} {'rsum':>7}")
    lines = [head, "-" * len(head)]
    for label, result in rows:
        a, s = result["image_to_text"], result["text_to_image"]
        lines.append(f"{label:<38} {a['r1']:>6.1f} {a['r5']:>6.1f} {a['r10']:>6.1f}  {a['median_rank']:>5g} "
                     f"{a['mean_rank']:>7.1f}   {s['r1']:>5.1f} {s['r5']:>5.1f} {s['r10']:>5.1f} "
                     f"{s['median_rank']:>5g} {s['mean_rank']:>7.1f} {result['rsum']:>7.1f}")
    return "\n".join(lines)
