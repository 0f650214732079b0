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
              standard_tokens (the default cleaning's word rules, whatever cleaning the model
              was trained with), never the training-cleaned descriptions.txt, so a cleaning
              that drops words (e.g. "a") cannot make its own references easier.
Diagnostics: share of distinct captions, number of distinct words used, share of generated
captions copied verbatim from a training caption (cleaned text), mean caption length, share
that never produced endseq (truncated at max_length).
Reads and writes no files. Imports captioning.data.text (the word rules); NLTK inside bleu_scores.
"""
import warnings

from captioning.data import text

TUTORIAL_WEIGHTS = [(1.0, 0, 0, 0), (0.5, 0.5, 0, 0), (0.3, 0.3, 0.3, 0), (0.25, 0.25, 0.25, 0.25)]
STANDARD_WEIGHTS = [(1.0,), (1 / 2,) * 2, (1 / 3,) * 3, (1 / 4,) * 4]
STANDARD_CLEANING = "default"   # the word rules of standard_tokens (text.clean_caption's modes)


def bleu_scores(references, hypotheses, weights_list):
    """NLTK corpus BLEU for each weight tuple -> {"bleu1": ..., "bleu2": ...}.

    references: per hypothesis, a list of token lists; hypotheses: token lists.
    """
    from nltk.translate.bleu_score import corpus_bleu
    with warnings.catch_warnings():          # NLTK warns when an n-gram order has no match (BLEU 0)
        warnings.simplefilter("ignore")
        return {f"bleu{n}": float(corpus_bleu(references, hypotheses, weights=w))
                for n, w in enumerate(weights_list, start=1)}


def standard_tokens(caption):
    """An original caption -> reference tokens, by the default cleaning's word rules.

    Lowercase; "-" and "/" separate words ("T-shirt" -> "t shirt"); a possessive 's is dropped
    ("dog's" -> "dog"); other punctuation is deleted; tokens that are not all letters
    (numbers such as "2" or "3rd") are dropped. These are text.clean_caption(..., "default")'s
    rules, whatever cleaning the model was trained with: the tokens of a reference are then
    tokens a captioner can produce ("dogs" or "tshirt" would be words no cleaned training
    caption contains), and a cleaning that drops more words (the tutorial's drops "a") still
    cannot make its own references easier.
    """
    return text.clean_caption(caption, STANDARD_CLEANING).split()


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
