"""The caption metrics papers report, and a fast CIDEr-D for self-critical training rewards.

Owns: `score_captions` (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D over a split), the two tokenisations
it can use (`ptb_tokenize`, `python_tokenize`), and `CiderD`, a CIDEr-D scorer whose document
frequencies are computed once, for per-caption rewards. Reads and writes no files of its own
(pycocoevalcap's Java tools write short-lived temporary files inside the pycocoevalcap package).

The published numbers come from the community's reference implementation, the `pycocoevalcap`
package (the COCO caption evaluation code): its Bleu (corpus BLEU, "closest" reference length),
Meteor (METEOR 1.5, a Java jar), Rouge (ROUGE-L, LCS F-measure with beta 1.2) and Cider scorers.
pycocoevalcap's "CIDEr" is CIDEr-D (Vedantam et al. 2015: no stemming, clipped n-gram counts,
a Gaussian length penalty with sigma 6, x10) -- the number the COCO leaderboard calls CIDEr-D.

CIDEr-D document frequencies (the idf) come from the references of the images being scored, the
COCO convention: scoring a split uses the references of that split's captioned images, so a
CIDEr-D figure depends on the split it was computed over. `CiderD` instead takes its document
frequencies from the references it is built from (for SCST: the training split), once.

Tokenisation (both references and hypotheses):
    "ptb"     when Java is present: pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1's PTB
              tokenizer, lowercased), then its punctuation tokens are removed. This is what
              papers' numbers use.
    "python"  without Java: NLTK's TreebankWordTokenizer (a Python version of the same Penn
              Treebank rules) plus the few fixes in `python_tokenize`, then the same punctuation
              removal. On the 40,460 Flickr8k captions it gives the PTB result for all but 4.
METEOR needs Java (there is no Python METEOR 1.5); without Java it is None and the result says why.
SPICE is left out: pycocoevalcap's SPICE downloads Stanford CoreNLP 3.6.0 and its models from
nlp.stanford.edu on first use, which cannot work offline (`SPICE_STATUS`).
"""
import math
import re
import shutil
import subprocess
from collections import Counter, defaultdict

import numpy as np
from nltk.tokenize import TreebankWordTokenizer
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

from captioning.utils import PipelineError

SPICE_STATUS = ("not computed: pycocoevalcap's SPICE downloads Stanford CoreNLP 3.6.0 models from "
                "nlp.stanford.edu on first use, which cannot work offline")
CIDER_N = 4          # n-gram orders 1..4, as pycocoevalcap's Cider
CIDER_SIGMA = 6.0    # Gaussian length-penalty width (words), as pycocoevalcap's Cider

_PUNCTUATION_TOKENS = frozenset(PUNCTUATIONS)
_TREEBANK = TreebankWordTokenizer()
# typographic characters PTB maps to its ASCII forms; all of them end up removed as punctuation
_TYPOGRAPHIC = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2018": "'",
                              "\u2019": "'", "\u201a": "'", "\u2014": " -- ", "\u2013": " -- "})
# PTB keeps the final period of these (and of dotted initials like "d.c."); a small list of the
# abbreviations captions use, not CoreNLP's full one
_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr mt ft vs etc co inc ltd no".split())
_DOTTED = re.compile(r"^(?:[a-z]\.)*[a-z]$")      # "d.c" or "b" before a final period


# ---- tokenisation ---------------------------------------------------------------------------------
def python_tokenize(text):
    """One caption -> its PTB-style tokens joined by spaces, lowercased, punctuation removed.

    Why not only NLTK: TreebankWordTokenizer splits only the text's last period and leaves "dog."
    inside a line, while CoreNLP's PTB tokenizer splits it (and keeps "st." or "d.c."); those two
    rules are added here. Brackets become -lrb-/-rrb- and stay, as in pycocoevalcap (it lowercases
    before comparing with its upper-case -LRB- punctuation entry).
    """
    text = " ".join(text.translate(_TYPOGRAPHIC).lower().split())
    tokens = []
    for token in _TREEBANK.tokenize(text, convert_parentheses=True):
        token = token.lower()
        stem = token[:-1]
        if (token.endswith(".") and len(stem) > 1 and stem.isalpha()
                and stem not in _ABBREVIATIONS):
            tokens.extend([stem, "."])        # "dog." inside a line: PTB splits the period
        else:
            tokens.append(token)
    if (len(tokens) >= 2 and tokens[-1] == "." and text.endswith(tokens[-2] + ".")
            and (_DOTTED.match(tokens[-2]) or tokens[-2] in _ABBREVIATIONS)):
        tokens[-2:] = [tokens[-2] + "."]      # "washington d.c." : PTB keeps the period on it
    for i in range(len(tokens) - 1):
        if tokens[i] == "'n" and tokens[i + 1] == "'":
            tokens[i:i + 2] = ["'n'", ""]     # "rock 'n' roll": one PTB token
    return " ".join(t for t in tokens if t and t not in _PUNCTUATION_TOKENS)


def ptb_tokenize(captions):
    """{id: [caption, ...]} -> {id: [tokenised caption, ...]} with pycocoevalcap's PTBTokenizer (Java).

    Whitespace inside a caption (a stray CR, a Unicode line separator) is folded to single spaces
    first: the Java tokenizer works line by line, and a second line would shift every later
    caption onto the wrong image.
    """
    wrapped = {key: [{"caption": " ".join(c.split())} for c in caps] for key, caps in captions.items()}
    try:
        tokenized = PTBTokenizer().tokenize(wrapped)
    except OSError as exc:
        raise PipelineError(f"the PTB tokenizer (java) could not run ({exc})") from None
    expected = sum(len(caps) for caps in captions.values())
    got = sum(len(caps) for caps in tokenized.values())
    if got != expected or tokenized.keys() != captions.keys():
        raise PipelineError(f"the PTB tokenizer (java) returned {got} captions for {expected}")
    return tokenized


def tokenize(captions, tokenizer):
    """{id: [caption, ...]} -> the same, tokenised by "ptb" or "python"."""
    if tokenizer == "ptb":
        return ptb_tokenize(captions)
    return {key: [python_tokenize(c) for c in caps] for key, caps in captions.items()}


_java_checked = {}


def java_available():
    """True when a working `java` is on PATH (checked once per process: `java -version`)."""
    if "ok" not in _java_checked:
        path = shutil.which("java")
        ok = False
        if path:
            try:
                ok = subprocess.run([path, "-version"], capture_output=True, timeout=60).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        _java_checked["ok"] = ok
    return _java_checked["ok"]


def resolve_java(java):
    """java = "auto" | True | False -> whether to use Java; True without Java is an error."""
    if java == "auto":
        return java_available()
    if java is True:
        if not java_available():
            raise PipelineError("Java was asked for but no working `java` is on PATH "
                                "(Debian/Ubuntu: apt-get install default-jre-headless)")
        return True
    if java is False:
        return False
    raise PipelineError(f"java must be 'auto', True or False, not {java!r}")


# ---- the published metrics ------------------------------------------------------------------------
def check_captions(references, hypotheses):
    """Refuse what would make a metric silently wrong; one-line PipelineError naming the image."""
    if not hypotheses:
        raise PipelineError("no hypotheses to score")
    missing = [key for key in hypotheses if key not in references]
    if missing:
        raise PipelineError(f"hypothesis for image {missing[0]} has no references "
                            f"({len(missing)} such image(s))")
    for key, hypothesis in hypotheses.items():
        if not isinstance(hypothesis, str):
            raise PipelineError(f"hypothesis for image {key} is not a string ({type(hypothesis).__name__})")
        refs = references[key]
        if isinstance(refs, str) or not refs:
            raise PipelineError(f"image {key} has no reference captions (need a non-empty list)")
        for number, caption in enumerate(refs, start=1):
            if not isinstance(caption, str) or not caption.strip():
                raise PipelineError(f"image {key} has an empty reference caption (#{number})")


def score_captions(references, hypotheses, java="auto", meteor=True):
    """Score one caption per image against its references with the COCO caption metrics.

    references: {image_id: [raw caption, ...]} (a superset of the scored images is fine);
    hypotheses: {image_id: caption}. The images scored are the hypotheses' images, and CIDEr-D's
    document frequencies come from their references. java: "auto" (use it when present), True
    (required), False (never: pure-Python path). meteor=False skips METEOR even with Java (its
    jar loads a 60 MB paraphrase table: ~7 s per call).

    Returns {"bleu_1".."bleu_4", "meteor" (None without Java), "rouge_l", "cider_d",
    "spice" (None), "tokenizer" ("ptb" | "python"), "n_images", "not_computed" {metric: reason}}.
    """
    check_captions(references, hypotheses)
    use_java = resolve_java(java)
    tokenizer = "ptb" if use_java else "python"
    ids = list(hypotheses)
    gts = tokenize({key: list(references[key]) for key in ids}, tokenizer)
    res = tokenize({key: [hypotheses[key]] for key in ids}, tokenizer)

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider(n=CIDER_N, sigma=CIDER_SIGMA).compute_score(gts, res)
    results = {f"bleu_{n}": float(b) for n, b in enumerate(bleu, start=1)}
    results.update({"rouge_l": float(rouge), "cider_d": float(cider), "meteor": None, "spice": None,
                    "tokenizer": tokenizer, "n_images": len(ids),
                    "not_computed": {"spice": SPICE_STATUS}})
    if use_java and meteor:
        results["meteor"] = meteor_score(gts, res)
    elif not meteor:
        results["not_computed"]["meteor"] = "not asked for (meteor=False)"
    else:
        results["not_computed"]["meteor"] = ("needs Java (METEOR 1.5 is a Java program): "
                                             + ("not used (java=False)" if java is False
                                                else "no working `java` on PATH"))
    return results


def meteor_score(gts, res):
    """Corpus METEOR from pycocoevalcap's Meteor (one `java -jar meteor-1.5.jar` process, ~2 GB heap)."""
    try:
        scorer = Meteor()
    except OSError as exc:
        raise PipelineError(f"METEOR (java) could not start ({exc})") from None
    try:
        score, _ = scorer.compute_score(gts, res)
    except (ValueError, OSError) as exc:   # the jar died: its stdout ended early
        scorer.meteor_p.kill()
        detail = scorer.meteor_p.stderr.read().decode(errors="replace").strip().splitlines()
        raise PipelineError(f"METEOR (java) failed: {detail[-1] if detail else exc}") from None
    finally:
        # pycocoevalcap only stops the jar in __del__; stop it now, deterministically
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
        scorer.meteor_p.stdout.close()
        scorer.meteor_p.stderr.close()
        scorer.__class__ = _StoppedMeteor
    return float(score)


class _StoppedMeteor(Meteor):
    """A Meteor whose jar was already stopped: its __del__ must not stop it again."""

    def __del__(self):
        pass


# ---- fast CIDEr-D for rewards ---------------------------------------------------------------------
def _ngram_counts(tokens, n=CIDER_N):
    """Counts of every 1..n-gram of a token sequence, as tuples (pycocoevalcap's precook)."""
    counts = Counter()
    for k in range(1, n + 1):
        counts.update(zip(*[tokens[i:] for i in range(k)]))    # the k-grams, counted in C
    return counts


class CiderD:
    """CIDEr-D of many captions against fixed references, document frequencies computed once.

    Built from {image_id: [reference, ...]} where a reference is a token sequence (a list of
    words or of token ids) or a string (split on spaces); hypotheses must use the same kind of
    tokens. Document frequencies and log(number of images) come from these references, and each
    reference's tf-idf vector is precomputed, so a reward costs one pass over the hypothesis's
    n-grams. Built from the references of exactly the images scored, it gives pycocoevalcap's
    CIDEr-D for each image (the tests check this); built from the training split, it is the
    reward of self-critical training (Rennie et al. 2017).

    Why not pycocoevalcap's CiderScorer: it recomputes the document frequencies and every
    reference's vector on each call, and takes them from the batch being scored.
    """

    def __init__(self, references, n=CIDER_N, sigma=CIDER_SIGMA):
        if not references:
            raise PipelineError("CiderD needs references for at least one image")
        self.n = n
        self.sigma = sigma
        counted = {}       # image -> [(n-gram counts, length) per reference]
        document_frequency = Counter()
        token_types = set()
        for key, refs in references.items():
            if isinstance(refs, str) or not refs:
                raise PipelineError(f"image {key} has no reference captions (need a non-empty list)")
            token_lists = [_as_tokens(r) for r in refs]
            for number, tokens in enumerate(token_lists, start=1):
                if not tokens:
                    raise PipelineError(f"image {key} has an empty reference caption (#{number})")
            counted[key] = [(_ngram_counts(t, n), self._length(t)) for t in token_lists]
            document_frequency.update({g for counts, _ in counted[key] for g in counts})
            token_types.update(type(t[0]) for t in token_lists)
        if len(token_types) > 1:
            raise PipelineError("CiderD references mix token kinds ("
                                + ", ".join(sorted(t.__name__ for t in token_types)) + ")")
        self.token_type = token_types.pop()
        self.log_images = math.log(float(len(references)))
        self.idf = {g: self.log_images - math.log(max(1.0, df)) for g, df in document_frequency.items()}
        # per image: ({ngram: [(slot, tf-idf), ...]} with slot = reference index * n + order,
        #             per-reference norms per order, per-reference lengths)
        self.tables = {key: self._reference_table(c) for key, c in counted.items()}

    def _length(self, tokens):
        """pycocoevalcap's caption length: its number of bigrams (words - 1), 0 if n < 2."""
        return max(len(tokens) - 1, 0) if self.n >= 2 else 0

    def _reference_table(self, counted):
        table = defaultdict(list)
        norms, lengths = [], []
        for index, (counts, length) in enumerate(counted):
            squares = [0.0] * self.n
            for gram, tf in counts.items():
                value = float(tf) * self.idf[gram]
                order = len(gram) - 1
                squares[order] += value * value
                table[gram].append((index * self.n + order, value))
            norms.append([math.sqrt(s) for s in squares])
            lengths.append(length)
        return dict(table), norms, lengths

    def score(self, image_id, tokens):
        """CIDEr-D of one hypothesis (token sequence or string) against image_id's references.

        The same arithmetic as pycocoevalcap's CiderScorer.compute_cider: per n-gram order, the
        cosine of clipped tf-idf vectors, times a Gaussian penalty on the length difference,
        averaged over orders and references, x 10.
        """
        tokens = _as_tokens(tokens)
        table, ref_norms, ref_lengths = self.tables[image_id]
        n, idf, unseen = self.n, self.idf, self.log_images   # unseen n-gram: df 0 -> idf log N
        squares = [0.0] * n
        dots = [0.0] * (len(ref_norms) * n)
        for gram, tf in _ngram_counts(tokens, n).items():
            value = float(tf) * idf.get(gram, unseen)
            squares[len(gram) - 1] += value * value
            for slot, ref_value in table.get(gram, ()):
                dots[slot] += (value if value < ref_value else ref_value) * ref_value   # clipped
        norms = [math.sqrt(s) for s in squares]
        length = self._length(tokens)
        total = 0.0
        for index, (ref_norm, ref_length) in enumerate(zip(ref_norms, ref_lengths)):
            delta = float(length - ref_length)
            penalty = math.exp(-(delta ** 2) / (2 * self.sigma ** 2))
            for order in range(n):
                dot = dots[index * n + order]
                if norms[order] != 0 and ref_norm[order] != 0:
                    dot /= norms[order] * ref_norm[order]
                total += dot * penalty
        return total / n / len(ref_norms) * 10.0

    def scores(self, ids, token_lists):
        """CIDEr-D per hypothesis: ids[i] is the image of token_lists[i] -> float64 array.

        Token lists may be lists, tuples, 1-D integer arrays or strings; an id repeats for
        several samples of the same image.
        """
        if len(ids) != len(token_lists):
            raise PipelineError(f"CiderD.scores got {len(ids)} ids for {len(token_lists)} captions")
        unknown = [key for key in ids if key not in self.tables]
        if unknown:
            raise PipelineError(f"image {unknown[0]} has no references in this CiderD "
                                f"({len(set(unknown))} such image(s))")
        out = np.empty(len(ids), dtype=np.float64)
        for row, (key, tokens) in enumerate(zip(ids, token_lists)):
            tokens = _as_tokens(tokens)
            if tokens and not isinstance(tokens[0], self.token_type):
                raise PipelineError(f"hypothesis tokens are {type(tokens[0]).__name__} but the "
                                    f"references' are {self.token_type.__name__}")
            out[row] = self.score(key, tokens)
        return out


def _as_tokens(tokens):
    """A caption as a list of hashable tokens: strings split on spaces, arrays to Python ints."""
    if isinstance(tokens, str):
        return tokens.split()
    if isinstance(tokens, np.ndarray):
        return tokens.tolist()
    tokens = list(tokens)
    if tokens and isinstance(tokens[0], np.integer):
        return [int(t) for t in tokens]
    return tokens
