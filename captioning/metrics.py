"""Caption quality numbers: corpus BLEU in two modes, the standard tokenisation, diagnostics.

BLEU is NLTK's corpus_bleu (corpus-level: n-gram counts pooled over all images; no smoothing):
    tutorial  exactly as J. Brownlee's Flickr8k tutorial computes it, to compare with its
              published 0.579/0.345/0.252/0.131: references are the TRAINING-CLEANED captions
              (descriptions.txt) wrapped as "startseq ... endseq"; the hypothesis keeps
              "startseq" and "endseq" (when generated); weights (1,0,0,0), (.5,.5,0,0),
              (.3,.3,.3,0) [sic: sums to 0.9, the tutorial's], (.25,.25,.25,.25). The free
              sentinel matches and the references cleaned the same way as the training text
              inflate it.
    standard  the way papers report it, the headline number: sentinels stripped, weights 1/n,
              references = the 5 ORIGINAL captions (references.json) tokenised by
              standard_tokens, never the training-cleaned ones, so a cleaning that drops words
              (e.g. "a") cannot make its own references easier.
Diagnostics: share of distinct captions, number of distinct words used, share of generated
captions copied verbatim from a training caption (cleaned text), mean caption length, share
that never produced endseq (truncated at max_length).
Reads and writes no files. Imports no project module; NLTK is imported inside bleu_scores.
"""
import string
import warnings

TUTORIAL_WEIGHTS = [(1.0, 0, 0, 0), (0.5, 0.5, 0, 0), (0.3, 0.3, 0.3, 0), (0.25, 0.25, 0.25, 0.25)]
STANDARD_WEIGHTS = [(1.0,), (1 / 2,) * 2, (1 / 3,) * 3, (1 / 4,) * 4]
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def bleu_scores(references, hypotheses, weights_list):
    """NLTK corpus BLEU for each weight tuple -> {"bleu1": ..., "bleu2": ...}.

    references: per hypothesis, a list of token lists; hypotheses: token lists.
    """
    from nltk.translate.bleu_score import corpus_bleu
    with warnings.catch_warnings():          # NLTK warns when an n-gram order has no match (BLEU 0)
        warnings.simplefilter("ignore")
        return {f"bleu{n}": float(corpus_bleu(references, hypotheses, weights=w))
                for n, w in enumerate(weights_list, start=1)}


def standard_tokens(text):
    """An original caption -> tokens: lowercase, punctuation characters deleted, split on space."""
    return text.lower().translate(_PUNCT_TABLE).split()


def tutorial_reference(cleaned_caption, start_token, end_token):
    """A training-cleaned caption -> the tutorial's reference tokens, sentinels included."""
    return [start_token] + cleaned_caption.split() + [end_token]


def tutorial_hypothesis(words, finished, start_token, end_token):
    """Generated words -> the tutorial's hypothesis: startseq kept, endseq if it was generated."""
    return [start_token] + list(words) + ([end_token] if finished else [])


def tutorial_bleu(cleaned_refs, generated, finished, start_token, end_token):
    """Tutorial-mode BLEU-1..4. cleaned_refs: per image, its cleaned captions (strings);
    generated: per image, the generated words; finished: per image, whether endseq was generated."""
    refs = [[tutorial_reference(c, start_token, end_token) for c in caps] for caps in cleaned_refs]
    hyps = [tutorial_hypothesis(w, f, start_token, end_token) for w, f in zip(generated, finished)]
    return bleu_scores(refs, hyps, TUTORIAL_WEIGHTS)


def standard_bleu(original_refs, generated):
    """Standard BLEU-1..4: original captions normalised by standard_tokens, no sentinels."""
    refs = [[standard_tokens(c) for c in caps] for caps in original_refs]
    return bleu_scores(refs, [list(w) for w in generated], STANDARD_WEIGHTS)


def diagnostics(generated, finished, training_captions):
    """Numbers that expose a model saying the same thing for every image.

    generated: list of word lists; training_captions: set of cleaned training caption strings.
    """
    texts = [" ".join(words) for words in generated]
    n = max(len(texts), 1)
    return {
        "n_captions": len(texts),
        "distinct_share": len(set(texts)) / n,
        "distinct_captions": len(set(texts)),
        "vocabulary_used": len({w for words in generated for w in words}),
        "copied_from_training_share": sum(t in training_captions for t in texts) / n,
        "mean_length_words": sum(len(w) for w in generated) / n,
        "unfinished_share": sum(not f for f in finished) / n,
    }
