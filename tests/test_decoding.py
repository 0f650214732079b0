"""Tests for captioning/inference/decoding.py's search over the step interface: greedy and beam
search on a hand-written next-word table (no model), beam 1 against greedy, banned ids, batches.
The step functions of the trained networks are tested in test_models.py, test_generate_caption.py
and test_grid_captioners.py."""
import math

import numpy as np
import pytest

from captioning.inference import decoding
from helpers import BANNED, END, ID, PAD, START, TABLE, WORDS, caption, table_step


def run(beam, max_length, alpha=0.0, n=1):
    states = np.zeros((n, 1), dtype=np.int64)            # one pad "seed" column per caption
    return decoding.decode(table_step, states, START, END, max_length, beam, alpha, BANNED)


@pytest.mark.parametrize("beam, max_length, expected, finished", [
    (1, 10, "a endless dog", True),          # greedy; "endless" contains "end" and does not stop it
    (2, 10, "the dog", True),
    (3, 10, "one cat sleeps weekend", True),  # "weekend" does not stop it either
    (1, 2, "a", False),                       # max_length counts startseq: 1 generated token
    (1, 3, "a endless", False),
    (1, 4, "a endless dog", False),           # 3 tokens, no room for endseq
    (1, 5, "a endless dog", True),
    (2, 3, "the dog", False),                 # beam 2 truncated after 2 tokens: best partial
    (3, 5, "the dog", True),                  # "one cat sleeps weekend" has no room to finish
    (3, 6, "one cat sleeps weekend", True),
])
def test_table_captions(beam, max_length, expected, finished):
    ids = run(beam, max_length)[0]
    assert caption(ids) == expected
    assert (ids[-1] == END) == finished
    assert len(ids) <= max_length - 1


def test_beam_1_is_greedy_whatever_alpha():
    """A hand-written table: the -> dog -> {endseq .52, runs .48}. Greedy stops at "the dog"; a
    one-beam search with length normalisation would say "the dog runs" (log .48 / 4**0.7 beats
    log .52 / 3**0.7). decode with beam 1 is greedy for any alpha; alpha acts from beam 2."""
    table = {(): {"the": 1.0}, ("the",): {"dog": 1.0}, ("the", "dog"): {"endseq": .52, "runs": .48},
             ("the", "dog", "runs"): {"endseq": 1.0}}

    def step(states, last_ids):
        return table_step(states, last_ids, table)

    states = np.zeros((1, 1), dtype=np.int64)
    for alpha in (0.0, 0.7, 1.0):
        assert caption(decoding.decode(step, states, START, END, 10, 1, alpha, BANNED)[0]) == "the dog"
    assert caption(decoding.decode(step, states, START, END, 10, 2, 0.7, BANNED)[0]) == "the dog runs"
    assert caption(decoding.decode(step, states, START, END, 10, 2, 0.0, BANNED)[0]) == "the dog"
    assert caption(decoding.beam_search(step, states, START, END, 10, 1, 0.7, BANNED)[0]) == "the dog runs"


def test_beam_beats_greedy_in_probability():
    def logp(ids):
        states, total = np.zeros((1, 1), dtype=np.int64), 0.0
        last = np.array([START])
        for i in ids:
            lp, states = table_step(states, last)
            total += lp[0, i]
            last = np.array([i])
        return total
    greedy, beam3 = run(1, 10)[0], run(3, 10)[0]
    assert math.isclose(math.exp(logp(greedy)), .096, rel_tol=1e-6)
    assert math.isclose(math.exp(logp(beam3)), .2375, rel_tol=1e-6)


def test_length_normalisation_changes_the_choice():
    # beam 2: "the dog" logp/3 = -0.584 loses to "the dog runs" logp/4 = -0.488 with alpha 1
    assert caption(run(2, 10, alpha=0.0)[0]) == "the dog"
    assert caption(run(2, 10, alpha=1.0)[0]) == "the dog runs"


def test_never_emits_pad_start_or_oov():
    states = np.array([[0, START, ID["the"]]])             # prefix "the", next "cat"
    for beam in (1, 2):
        ids = decoding.decode(table_step, states, ID["cat"], END, 10, beam, 0.0, BANNED)[0]
        assert caption(ids) == "sleeps", beam
    with_pad_allowed = decoding.greedy_decode(table_step, states, ID["cat"], END, 10, banned_ids=())[0]
    assert with_pad_allowed[0] == PAD                       # the table really prefers pad


def test_batched_images_decode_independently():
    # the state's first column tags the image: image 1 prefers "one", image 2 must say "the"
    tables = {0: TABLE, 1: {**TABLE, (): {"one": .6, "a": .4}}, 2: {**TABLE, (): {"the": 1.0}}}

    def step(states, last_ids):
        logps = np.empty((len(states), len(WORDS)))
        for row, tag in enumerate(states[:, 0]):
            logps[row], _ = table_step(states[row:row + 1], last_ids[row:row + 1], tables[int(tag)])
        return logps, np.concatenate([states, np.asarray(last_ids)[:, None]], axis=1)

    tags = np.array([[0], [1], [2], [0]])
    for beam, expected in [(1, ["a endless dog", "one cat sleeps weekend", "the dog", "a endless dog"]),
                           (3, ["one cat sleeps weekend"] * 2 + ["the dog", "one cat sleeps weekend"])]:
        together = decoding.decode(step, tags, START, END, 10, beam, 0.0, BANNED)
        alone = [decoding.decode(step, tags[i:i + 1], START, END, 10, beam, 0.0, BANNED)[0] for i in range(4)]
        assert [caption(ids) for ids in together] == expected
        assert together == alone


def random_tables(seed, vocab=12, captions=40):
    """(step_fn, states): a random bigram model mixed with a per-caption bias carried in the
    state, for 40 captions; ids 1 and 2 serve as start and end, 0 is banned."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(vocab, vocab)) * 3

    def step(states, last_ids):
        logits = weights[last_ids] + states
        logits = logits - logits.max(axis=1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)), states

    return step, rng.normal(size=(captions, vocab))


def test_beam1_equals_greedy_on_random_tables():
    step, states = random_tables(0)
    greedy = decoding.greedy_decode(step, states, 1, 2, 9, [0])
    beam1 = decoding.beam_search(step, states, 1, 2, 9, beam=1, banned_ids=[0])
    assert greedy == beam1
    beam4 = decoding.beam_search(step, states, 1, 2, 9, beam=4, banned_ids=[0])
    assert all(len(b) <= 8 and 0 not in b for b in beam4)


def test_beam_candidates_of_the_table_by_hand():
    # beam 3, alpha 0 on TABLE: "the dog" finishes at t 3 (.17325) but "one cat sleeps" (.2375)
    # lives on; "the dog runs" (.14175) and "a endless dog" (.096) finish at t 4, "one cat sleeps
    # weekend" (.2375) at t 5, after which nothing live can beat it
    states = np.zeros((1, 1), dtype=np.int64)
    n_best = decoding.beam_search(table_step, states, START, END, 10, 3, 0.0, BANNED, candidates=True)[0]
    assert [caption(ids) for ids, _ in n_best] == ["one cat sleeps weekend", "the dog", "the dog runs",
                                                   "a endless dog"]
    assert [s for _, s in n_best] == pytest.approx(np.log([.2375, .17325, .14175, .096]), rel=1e-6)
    assert n_best[0][0] == run(3, 10)[0]
    # alpha 1 divides by the tokens generated (endseq included): the order changes
    n_best = decoding.decode(table_step, states, START, END, 10, 3, 1.0, BANNED, candidates=True)[0]
    assert [caption(ids) for ids, _ in n_best][:2] == ["one cat sleeps weekend", "the dog runs"]
    assert n_best[0][1] == pytest.approx(np.log(.2375) / 5, rel=1e-6)
    # truncated before anything finished: the plain result alone, score -inf
    assert decoding.decode(table_step, states, START, END, 3, 2, 0.0, BANNED, candidates=True)[0] == [
        (run(2, 3)[0], -np.inf)]
    with pytest.raises(Exception, match="beam >= 2"):
        decoding.decode(table_step, states, START, END, 10, 1, 0.0, BANNED, candidates=True)


def test_beam_candidates_start_with_the_plain_result_on_random_tables():
    step, states = random_tables(1)
    for beam, alpha in [(2, 0.0), (3, 0.7), (5, 0.7)]:
        plain = decoding.beam_search(step, states, 1, 2, 9, beam, alpha, [0])
        n_best = decoding.beam_search(step, states, 1, 2, 9, beam, alpha, [0], candidates=True)
        assert [options[0][0] for options in n_best] == plain
        for options in n_best:
            scores = [s for _, s in options]
            assert scores == sorted(scores, reverse=True)
            assert len({tuple(ids) for ids, _ in options}) == len(options)
        assert max(len(options) for options in n_best) > 1
