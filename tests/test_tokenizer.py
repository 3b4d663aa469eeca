"""Scores are the standard ones: with Java, pycocoevalcap's own PTB pipeline exactly; without it, a Python
tokenizer that follows PTB on hyphens, clitics and punctuation."""

import shutil

import pytest

import training_script as ts

# Flickr- and COCO-style captions full of what tokenizers disagree on: hyphens, clitics, brackets, quotes,
# abbreviations, numbers, symbols, pre-tokenized punctuation.
CAPTIONS = [
    "A man in a black t-shirt is playing the guitar.", "Two dogs can't catch the frisbee!",
    "A black-and-white dog jumps over a log.", "A woman's purse (red) sits on a bench.",
    'The kids are playing "tag" in the park; it\'s sunny.', "A 3-year-old girl eats ice-cream at 5:30 p.m.",
    "Mr. Smith, age 45, won't stop - he runs.", "A man and/or woman walk by a U.S. flag...",
    "A $5 bill & 50% off sign.", "They're going to the store, aren't they?",
    "I'd say it's a well-known place -- really.", "A girl's dog's toy is blue-green.", "Cannot see the 1,000 people",
    "A man's 'special' hat", "people at the rock-climbing wall", "a boy wearing a red-and-white striped shirt",
    "Two men, one in a hard-hat, work on a roof.", "A dog runs across the grass .",
    'A man says " hello " to a red circle .', "A surfer rides a wave at e.g. sunset", "Women in their 20's dance",
    "A child's toy #1", "A cat sits on the mat's edge!!", "Someone's got 2.5 kg of rice",
    "A police officer talks to a man wearing a hi-vis jacket", "a snowboarder in mid-air",
    "rock 'n' roll band on stage", "He's gonna win", "the man , who is wearing a hat , smiles",
    "A group of people ... waiting", "Colleagues at a 9-to-5 job", "A team's well-deserved win: 3-2!",
    "O'Neil's pub on St. Patrick's day", "A man in a t-shirt and jeans-shorts",
    "two people (a man and a woman) on a bike", "A young boy in a Yankees' cap",
    "A boy's bike isn't red.", "Three kids -- two girls and a boy -- play.", "A dog (brown) and a cat [white].",
    "What's that? A bird!", "The 1980's-style car at 10:45 a.m. on Main St.",
    "Two women wearing sun-hats; one holds a baby.", "A man's hand-held camera...",
    "A toddler in a pink tutu dances, smiling", '"Stop!" says the sign.', "He'll be there, won't he?",
    "a woman in a blue shirt , black pants , and white shoes", "A well-dressed man with a briefcase; he's late!",
    "cats vs. dogs", "A sign reading 'no parking'",
]
needs_java = pytest.mark.skipif(not shutil.which("java"), reason="the reference PTB tokenizer runs on Java")


def references_and_predictions():
    """Ten images with five reference captions each; each prediction is another image's caption, so the scores
    are neither 0 nor 1."""
    references = {f"{i}.jpg": CAPTIONS[5 * i:5 * i + 5] for i in range(10)}
    predictions = {f"{i}.jpg": CAPTIONS[(5 * i + 7) % 50] for i in range(10)}
    return references, predictions


def pycocoevalcap_pipeline(references, predictions):
    """What COCOEvalCap does: PTB-tokenize references and predictions with Java, then score."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": predictions[k]}] for k in references})
    scores = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], Bleu(4).compute_score(gts, res, verbose=0)[0]))
    scores["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    scores["CIDEr"] = Cider().compute_score(gts, res)[0]
    scores["METEOR"] = Meteor().compute_score(gts, res)[0]
    return scores


@needs_java
def test_scores_equal_pycocoevalcaps_own_pipeline_exactly():
    references, predictions = references_and_predictions()
    expected = pycocoevalcap_pipeline(references, predictions)
    scores, notes = ts.score_captions(references, predictions)
    assert {metric: scores[metric] for metric in expected} == expected
    assert "tokenizer: PTB (Java, pycocoevalcap)" in notes
    assert 0.05 < expected["Bleu_1"] < 0.9  # captions that share some words, not all


@needs_java
def test_python_tokenizer_follows_ptb_token_for_token():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(CAPTIONS)})
    differing = [(c, java[i][0], ts.ptb_like_tokenize(c)) for i, c in enumerate(CAPTIONS)
                 if ts.ptb_like_tokenize(c) != java[i][0]]
    assert not differing


@needs_java
def test_without_java_scores_stay_within_0_2_percent_and_say_so(monkeypatch):
    references, predictions = references_and_predictions()
    expected = pycocoevalcap_pipeline(references, predictions)
    monkeypatch.setattr(ts.shutil, "which", lambda name: None)  # a machine without Java
    scores, notes = ts.score_captions(references, predictions)
    assert "tokenizer: PTB-like (Python)" in notes and "METEOR" not in scores
    for metric, value in scores.items():
        assert value == pytest.approx(expected[metric], rel=0.002), metric


def test_python_tokenizer_keeps_hyphens_and_splits_clitics():
    assert ts.ptb_like_tokenize("A man in a T-shirt can't see the dog's ball, on the GRASS.") == \
        "a man in a t-shirt ca n't see the dog 's ball on the grass"
