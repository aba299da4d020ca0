"""The toy task: short product reviews from a small probabilistic grammar.

A document is a header naming the domain, then two or three sentences, then <|endoftext|>:

    phone review : the battery is very good . the screen is poor and the camera is lovely .
    i would recommend it .

Two domains (phone, hotel), four aspects each, three sentiment classes of adjectives and seven
sentence templates. Each review draws a mood (positive, negative or mixed) that colours its
adjectives and its recommendation, so the SFT model learns sentiment that is *mostly* consistent
within a review, as real text is. Everything is rendered with spaces around punctuation so that
the BPE tokenizer (toy_tasks/tokenizer.py) turns almost every word into one token.

RL prompts are the header plus the first two words of a review ("phone review : the battery"),
so every prompt has the same number of tokens and batching needs no padding. The evaluation
prompt set is a fixed list drawn with its own seed (`eval_prompts`).

`is_grammatical(text)` is the held-out quality measure: True when a whole document (prompt +
completion) is exactly a sentence sequence of the grammar for its domain. RL never sees it.
See reward.py for the reward and worked examples.
"""

import random
import re

DOMAINS = {
    "phone": ["battery", "screen", "camera", "speaker"],
    "hotel": ["room", "staff", "breakfast", "pool"],
}
POSITIVE = ["good", "great", "excellent", "lovely", "superb", "perfect"]
NEGATIVE = ["bad", "poor", "awful", "terrible", "weak", "noisy"]
NEUTRAL = ["okay", "fine", "average"]
ADJECTIVES = POSITIVE + NEGATIVE + NEUTRAL

# Sentence templates: A = an aspect of the review's domain, J = an adjective, D = the domain.
TEMPLATES = [
    "the A is J .",
    "the A is very J .",
    "i think the A is J .",
    "the A is J and the A is J .",
    "overall a J D .",
    "i would recommend it .",
    "i would not recommend it .",
]
EOT = "<|endoftext|>"
MAX_SENTENCES = 3


def header(domain):
    return f"{domain} review :"


def _adjective(rng, mood):
    if mood == "positive":
        pool = POSITIVE if rng.random() < 0.85 else NEUTRAL + NEGATIVE
    elif mood == "negative":
        pool = NEGATIVE if rng.random() < 0.85 else NEUTRAL + POSITIVE
    else:
        pool = ADJECTIVES
    return rng.choice(pool)


def _sentence(rng, domain, mood):
    while True:
        template = rng.choice(TEMPLATES)
        recommend = "recommend" in template
        if not recommend or mood == "mixed" or (("not" in template) == (mood == "negative")):
            break
    words = []
    for slot in template.split():
        if slot == "A":
            words.append(rng.choice(DOMAINS[domain]))
        elif slot == "J":
            words.append(_adjective(rng, mood))
        elif slot == "D":
            words.append(domain)
        else:
            words.append(slot)
    return " ".join(words)


def sample_review(rng: random.Random):
    """One document body (without the end-of-text marker): header + 2-3 sentences."""
    domain = rng.choice(sorted(DOMAINS))
    mood = rng.choice(["positive", "negative", "mixed"])
    sentences = [_sentence(rng, domain, mood) for _ in range(rng.randint(2, MAX_SENTENCES))]
    return header(domain) + " " + " ".join(sentences)


def corpus(n_docs, seed=0):
    """A deterministic training corpus: n_docs reviews, each followed by <|endoftext|>."""
    rng = random.Random(seed)
    return "".join(EOT + sample_review(rng) for _ in range(n_docs))


def prompt_from_review(review, n_words=2):
    """Header plus the first n_words words of the review's first sentence."""
    words = review.split()
    return " ".join(words[: 3 + n_words])   # header is 3 words: "<domain> review :"


def all_prompts():
    """Every distinct prompt the grammar can start with (sorted, deterministic)."""
    prompts = set()
    for domain, aspects in DOMAINS.items():
        firsts = {"i think", "overall a", "i would"} | {f"the {a}" for a in aspects}
        prompts |= {f"{header(domain)} {f}" for f in firsts}
    return sorted(prompts)


def train_prompts(n, rng: random.Random):
    """RL prompts: openings of freshly sampled reviews, so their frequencies follow the corpus."""
    return [prompt_from_review(sample_review(rng)) for _ in range(n)]


def eval_prompts(n=128, seed=12345):
    """The fixed evaluation prompt set (same seed -> same list, independent of training)."""
    return train_prompts(n, random.Random(seed))


def domain_of(text):
    first = text.split()[0] if text.split() else ""
    return first if first in DOMAINS else None


def _sentence_regex(domain):
    alternatives = []
    for template in TEMPLATES:
        parts = []
        for slot in template.split():
            if slot == "A":
                parts.append("(?:" + "|".join(DOMAINS[domain]) + ")")
            elif slot == "J":
                parts.append("(?:" + "|".join(ADJECTIVES) + ")")
            elif slot == "D":
                parts.append(domain)
            else:
                parts.append(re.escape(slot))
        alternatives.append(" ".join(parts))
    return "(?:" + "|".join(alternatives) + ")"


_DOC_REGEX = {
    d: re.compile(re.escape(header(d)) + f"(?: {_sentence_regex(d)}){{1,{MAX_SENTENCES}}}")
    for d in DOMAINS
}


def is_grammatical(document):
    """True if `document` (prompt + completion, without <|endoftext|>) is a review of the grammar.

    The completion must have ended (the caller strips the end-of-text marker and passes
    finished=False if the sample ran out of tokens first -- see reward.quality).
    """
    domain = domain_of(document)
    return domain is not None and _DOC_REGEX[domain].fullmatch(document.strip()) is not None
