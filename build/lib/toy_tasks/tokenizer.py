"""The toy task's tokenizer: tiktoken BPE whose ranks were trained offline on the review corpus.

The ranks ship as `toy_tasks/reviews.tiktoken` (tiktoken's own file format: one base64 token
and its rank per line) and are loaded with an expected SHA-256, so a corrupted or edited file is
refused instead of silently changing every token id. `python -m toy_tasks.tokenizer` rebuilds
the file (deterministically) and prints the new hash to paste below.

choice: 397 ranks = the 256 single bytes + 141 merges, the point at which every word of the
grammar has become a single token (more merges exhaust the corpus's pairs). One special token,
<|endoftext|>, both starts and ends every document, so the model's vocabulary is 398.
"""

import base64
import functools
import hashlib
import os

import tiktoken
import tiktoken.load

from toy_tasks.reviews import EOT, corpus

PAT_STR = r""" ?[a-z]+| ?[^\sa-z]+|\s+"""   # words with their leading space, punctuation, spaces
N_RANKS = 397
RANKS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reviews.tiktoken")
RANKS_SHA256 = "0245f85b094a90da1833782836a609565ce6a86869ddb52cb5f767ed4500a535"


def train_ranks(n_docs=500, seed=0, n_ranks=N_RANKS):
    """Train BPE ranks on the corpus. The only use of tiktoken's private educational trainer."""
    from tiktoken._educational import bpe_train  # private module: pinned behind this function
    text = corpus(n_docs, seed).replace(EOT, "\n")
    return bpe_train(text, n_ranks, PAT_STR, visualise=None)


def write_ranks(ranks, path=RANKS_FILE):
    """Write ranks in tiktoken's file format (what tiktoken.load.load_tiktoken_bpe reads)."""
    lines = [base64.b64encode(tok) + b" " + str(rank).encode() for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    data = b"\n".join(lines) + b"\n"
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    ranks = tiktoken.load.load_tiktoken_bpe(RANKS_FILE, expected_hash=RANKS_SHA256)
    return tiktoken.Encoding(name="warp-min-reviews", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


def eot_id():
    return get_tokenizer().eot_token


def encode(text):
    """Text (may contain <|endoftext|>) -> list of token ids."""
    return get_tokenizer().encode(text, allowed_special={EOT})


def decode(ids):
    return get_tokenizer().decode(list(ids))


class ToyTokenizer:
    """What sampling and evaluation in warp_min.py need from a tokenizer. A checkpoint's tokenizer
    (warp_scale/tokenizer.py, for --init) has the same members, so the RL loop runs on either."""

    stop_ids = property(lambda self: (eot_id(),))   # the tokens that end a completion
    vocab_size = property(lambda self: eot_id() + 1)

    def encode_prompt(self, text):
        """A prompt as the start of a document: <|endoftext|> (which starts every document) + text."""
        return encode(EOT + text)

    def decode(self, ids):
        return decode(ids)


if __name__ == "__main__":
    digest = write_ranks(train_ranks())
    print(f"wrote {RANKS_FILE}\nRANKS_SHA256 = \"{digest}\"")
