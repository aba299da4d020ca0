"""The tokenizer of a Hugging Face checkpoint directory, for `python warp_min.py --init DIR`.

Reads DIR/tokenizer.json with the `tokenizers` package (an optional extra: `pip install tokenizers`)
and offers what the WARP loop needs, the same members as the toy's toy_tasks.tokenizer.ToyTokenizer:

    encode_prompt(text) -> ids   a prompt as the start of a document (with <bos> if the model has one)
    decode(ids) -> text          a completion's text, special tokens dropped
    stop_ids                     the tokens that end a completion (the first also pads)
    vocab_size                   tokens the tokenizer can emit (must fit the model's embedding)

Every failure is a ValueError with a one-line message (the CLI reports it with exit status 2).
"""

import json
import os

# choice: if config.json names no eos token, these are tried in the tokenizer (Gemma's is <eos>)
EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>")


class HFTokenizer:
    def __init__(self, tokenizer, stop_ids, bos_id=None, chat=None):
        self.tokenizer, self.stop_ids, self.bos_id, self.chat = tokenizer, tuple(stop_ids), bos_id, chat
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_prompt(self, text):
        if self.chat is not None:                 # the chat template's user turn + the model's turn opening
            ids = list(self.chat(text))
        else:                                     # tokenizer.json's own template (Gemma's adds <bos>)
            ids = self.tokenizer.encode(text).ids
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


def _ids(token_id):
    """config.json token ids may be an int or a list (instruction-tuned Gemma: [<eos>, <end_of_turn>])."""
    return [t for t in (token_id if isinstance(token_id, list) else [token_id]) if isinstance(t, int)]


def chat_encoder(path, tokenizer, bos_id, eos_id):
    """text -> ids of the chat template's user turn followed by the opening of the model's turn
    (add_generation_prompt), rendered by transformers from DIR/chat_template.jinja or the
    chat_template of DIR/tokenizer_config.json."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        raise ValueError("--chat-template needs the optional transformers package (pip install transformers)") from None
    template = _json(os.path.join(path, "tokenizer_config.json")).get("chat_template")
    if os.path.isfile(os.path.join(path, "chat_template.jinja")):
        with open(os.path.join(path, "chat_template.jinja")) as f:
            template = f.read()
    if isinstance(template, list):          # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str) or not template:
        raise ValueError(f"--chat-template: {path} has no chat template (chat_template.jinja, or chat_template "
                         f"in tokenizer_config.json)")
    names = {k: tokenizer.id_to_token(i) for k, i in (("bos_token", bos_id), ("eos_token", eos_id)) if i is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=template, **names)
    return lambda text: fast.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)


def load(path, chat_template=False) -> HFTokenizer:
    """DIR/tokenizer.json, with stop (and bos) ids from DIR/config.json and generation_config.json,
    else from the tokenizer; with chat_template, prompts go through the checkpoint's chat template."""
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
    # every stop id that config.json or generation_config.json names, in that order
    generation = _json(os.path.join(path, "generation_config.json"))
    stop_ids = list(dict.fromkeys(_ids(config.get("eos_token_id")) + _ids(generation.get("eos_token_id"))))
    if not stop_ids:
        special = _json(os.path.join(path, "tokenizer_config.json")).get("eos_token")
        special = special.get("content") if isinstance(special, dict) else special
        names = ([special] if special else []) + list(EOS_NAMES)
        stop_ids = [t for t in (tokenizer.token_to_id(n) for n in names) if t is not None][:1]
    if not stop_ids:
        raise ValueError(f"no eos token: neither {path}/config.json (eos_token_id) nor the tokenizer names one")
    bos = (_ids(config.get("bos_token_id")) or [None])[0]
    chat = chat_encoder(path, tokenizer, bos, stop_ids[0]) if chat_template else None
    return HFTokenizer(tokenizer, stop_ids, bos, chat)
