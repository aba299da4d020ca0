"""The tokenizer of a Hugging Face checkpoint directory, for `python warp_min.py demo --init DIR`.

Reads DIR/tokenizer.json with the `tokenizers` package (an optional extra: `pip install tokenizers`)
and offers what the WARP loop needs, the same members as the toy's toy_tasks.tokenizer.ToyTokenizer:

    encode_prompt(text) -> ids   a prompt as the start of a document (with <bos> if the model has one)
    decode(ids) -> text          a completion's text, special tokens dropped
    eos_id                       the token that ends a completion
    vocab_size                   tokens the tokenizer can emit (must fit the model's embedding)

Every failure is a ValueError with a one-line message (warp_min.py reports it with exit status 2).
"""

import json
import os

# choice: if config.json names no eos token, these are tried in the tokenizer (Gemma's is <eos>)
EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>")


class HFTokenizer:
    def __init__(self, tokenizer, eos_id, bos_id=None):
        self.tokenizer, self.eos_id, self.bos_id = tokenizer, eos_id, bos_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_prompt(self, text):
        ids = self.tokenizer.encode(text).ids     # with tokenizer.json's own template (Gemma's adds <bos>)
        # choice: a model with a bos token always sees it first, whether or not the template adds it
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _json(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _first(token_id):
    """config.json token ids may be an int or a list (instruction-tuned Gemma: [<eos>, <end_of_turn>])."""
    return token_id[0] if isinstance(token_id, list) and token_id else token_id if isinstance(token_id, int) else None


def load(path) -> HFTokenizer:
    """DIR/tokenizer.json, with eos (and bos) ids from DIR/config.json, else from the tokenizer."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError("reading tokenizer.json needs the optional 'tokenizers' package "
                         "(pip install tokenizers)") from None
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise ValueError(f"no tokenizer.json in {path} (prompts are encoded with the checkpoint's tokenizer)")
    try:
        tokenizer = Tokenizer.from_file(file)
    except Exception as e:  # the Rust side raises plain Exception
        raise ValueError(f"cannot read {file}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    config = _json(os.path.join(path, "config.json"))
    nested = config.get("text_config") or {}                    # multimodal Gemma 3 nests the language model
    config = {**nested, **{key: value for key, value in config.items() if value is not None}}
    eos_id = _first(config.get("eos_token_id"))
    if eos_id is None:
        special = _json(os.path.join(path, "tokenizer_config.json")).get("eos_token")
        special = special.get("content") if isinstance(special, dict) else special
        names = ([special] if special else []) + list(EOS_NAMES)
        eos_id = next((tokenizer.token_to_id(n) for n in names if tokenizer.token_to_id(n) is not None), None)
    if eos_id is None:
        raise ValueError(f"no eos token: neither {path}/config.json (eos_token_id) nor the tokenizer names one")
    return HFTokenizer(tokenizer, eos_id, _first(config.get("bos_token_id")))
