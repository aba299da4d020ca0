"""The synthetic reward: a proxy for "a helpful, positive, on-topic review" that can be hacked.

r(prompt, completion) is the sum of five parts, each learnable on its own, so independent RL runs
can pick up different parts first and merging their weights has something to combine:

    sentiment   sqrt(#positive adjectives) - 0.5 * #negative adjectives
    coverage    +0.3 per distinct aspect of the review's domain it mentions (battery, screen, ...)
    off_topic   -0.5 per mention of an aspect of the *other* domain
    recommend   +0.5 if it says "would recommend", -0.5 if it says "not recommend"
    length      -0.05 * |#words of the completion - 16|

A grammatical review tops out near 3.3; a degenerate string that repeats positive words and lists
aspects scores far more (sqrt grows without bound), which is what RL with no KL penalty finds.
That is the point: the reward is a *proxy*. Beside it, `quality` is the held-out measure RL never
optimises -- the fraction of completions the corpus grammar accepts (toy_tasks.reviews) -- so a
table can show what over-optimisation costs. Worked examples: toy_tasks/__init__.py.

Everything is batched and deterministic: lists of strings in, float32 tensors out.
"""

import math

import torch

from toy_tasks.reviews import DOMAINS, NEGATIVE, POSITIVE, domain_of, is_grammatical

LENGTH_TARGET = 16
_POSITIVE, _NEGATIVE = set(POSITIVE), set(NEGATIVE)


def reward_parts(prompt: str, completion: str) -> dict:
    """The five parts of r for one (prompt, completion); completion excludes <|endoftext|>."""
    domain = domain_of(prompt)
    words = completion.split()
    document = (prompt + " " + completion).split()
    on_topic = set(DOMAINS.get(domain, []))
    off_topic = {a for d, aspects in DOMAINS.items() if d != domain for a in aspects}
    text = " ".join(words)
    return {
        "sentiment": math.sqrt(sum(w in _POSITIVE for w in words)) - 0.5 * sum(w in _NEGATIVE for w in words),
        "coverage": 0.3 * len(on_topic.intersection(document)),
        "off_topic": -0.5 * sum(w in off_topic for w in document),
        "recommend": 0.5 * ("would recommend" in text) - 0.5 * ("not recommend" in text),
        "length": -0.05 * abs(len(words) - LENGTH_TARGET),
    }


def reward(prompts, completions) -> torch.Tensor:
    """r(x, y) for a batch: (B,) float32."""
    return torch.tensor([sum(reward_parts(p, c).values()) for p, c in zip(prompts, completions)],
                        dtype=torch.float32)


def reward_breakdown(prompts, completions) -> dict:
    """Mean of each part over the batch (for logging which parts a policy has learned)."""
    parts = [reward_parts(p, c) for p, c in zip(prompts, completions)]
    return {k: sum(p[k] for p in parts) / max(len(parts), 1) for k in parts[0]} if parts else {}


def quality(prompts, completions, finished) -> torch.Tensor:
    """Held-out quality: 1.0 where prompt + completion is a finished, grammatical review."""
    return torch.tensor([float(f and is_grammatical(p + " " + c))
                         for p, c, f in zip(prompts, completions, finished)], dtype=torch.float32)
