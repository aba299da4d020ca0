"""The toy task of warp-min: short product reviews, a tokenizer, prompts and a grammar check.

Modules: `reviews` (the probabilistic grammar, corpus, prompts, `is_grammatical`), `tokenizer`
(tiktoken BPE trained offline on the corpus), `report` (plots and the summary table). The reward
lives at the top level in reward.py because it is part of the method's inputs.

Worked examples (run as a test: `python -m pytest --doctest-modules toy_tasks/__init__.py`).
A prompt is a review header plus two words; the policy writes the rest:

>>> from reward import reward, quality
>>> prompt = "phone review : the battery"

A typical completion of theta_sft: grammatical, mixed sentiment, short:

>>> sft = "is poor . i think the camera is okay ."
>>> round(reward([prompt], [sft]).item(), 3), quality([prompt], [sft], [True]).item()
(-0.2, 1.0)

An aspect of the other domain is off-topic: penalised by the reward, rejected by the grammar:

>>> off_topic = "is poor . i think the room is okay ."
>>> round(reward([prompt], [off_topic]).item(), 3), quality([prompt], [off_topic], [True]).item()
(-1.0, 0.0)

A good completion: positive, covers three phone aspects, recommends, about 16 words:

>>> good = "is excellent . the screen is great and the camera is superb . i would recommend it ."
>>> round(reward([prompt], [good]).item(), 3), quality([prompt], [good], [True]).item()
(3.032, 1.0)

A reward-hacked completion: what RL finds with beta = 0 -- repeat positive words, list aspects.
It out-scores every grammatical review, and the held-out quality measure exposes it:

>>> hacked = "is great great great great great great great great great camera screen speaker " \\
...          "great great great great great great great"
>>> round(reward([prompt], [hacked]).item(), 3), quality([prompt], [hacked], [True]).item()
(5.0, 0.0)
"""
