"""Your prompts and your reward: the warp_min.Task that the RL loop runs on.

    --prompts FILE             .txt: one prompt per line; .jsonl: one {"prompt": "..."} object per line
    --reward module:function   any Python callable (prompts, completions) -> list of floats, found by its
                               import path (or path/to/file.py:function), as TRL's reward_funcs
    --reward-model DIR         a Hugging Face sequence-classification reward model (needs transformers)
    --chat-template            each prompt wrapped in the checkpoint's chat template (needs transformers)

Without them the task is the toy's: review prompts, the proxy reward of reward.py, grammaticality as
the held-out quality (which exists only for the toy's prompts). Everything that can be checked before
training is checked by make_task (TaskError: one line, exit status 2); a reward that fails during
training stops the run with one line (RewardError, exit status 1).
"""

import importlib
import importlib.util
import json
import os
import random
import sys

import torch

import warp_min as W
from toy_tasks.tokenizer import ToyTokenizer
from warp_scale import tokenizer as hf_tokenizer


class TaskError(ValueError):
    """A bad --prompts / --reward / --reward-model / --chat-template: one line, exit status 2."""


class RewardError(RuntimeError):
    """The reward failed during training: one line, exit status 1."""


# ----------------------------------------------------------------------------------------------
# Prompts: a file, split once into a held-out evaluation set and the training prompts.
# ----------------------------------------------------------------------------------------------


def read_prompts(path):
    """Prompts of a .txt file (one per non-empty line) or a .jsonl file (a "prompt" field per line)."""
    if not os.path.isfile(path):
        raise TaskError(f"--prompts {path}: no such file")
    if not path.endswith((".txt", ".jsonl")):
        raise TaskError(f"--prompts {path}: expected a .txt (one prompt per line) or .jsonl file")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".txt"):
                prompts.append(line.rstrip("\n"))
                continue
            try:
                prompt = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError):
                raise TaskError(f"--prompts {path}: line {number} is not a JSON object with a \"prompt\" field") from None
            if not isinstance(prompt, str):
                raise TaskError(f"--prompts {path}: line {number}: \"prompt\" is not a string")
            prompts.append(prompt)
    return prompts


def split_prompts(prompts, n_eval, path):
    """choice: the file's prompts shuffled once with seed 0; the first n_eval are held out for evaluation
    (never trained on), the rest are the training prompts, drawn with replacement by each run's seed."""
    if len(prompts) < n_eval + 1:
        raise TaskError(f"--prompts {path}: {len(prompts)} prompts; need more than --eval-prompts {n_eval} "
                        f"(the held-out evaluation set) to have any left to train on")
    order = list(prompts)
    random.Random(0).shuffle(order)
    return order[n_eval:], order[:n_eval]


# ----------------------------------------------------------------------------------------------
# Rewards: a Python function, or a reward model.
# ----------------------------------------------------------------------------------------------


def load_function(spec):
    """module:function or path/to/file.py:function -> the callable (the only user code warp-min imports)."""
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise TaskError(f"--reward {spec}: expected module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise TaskError(f"--reward {spec}: no such file {module_name}")
            loader = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:   # a console script does not put the working directory first
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except TaskError:
        raise
    except Exception as e:  # the user's module failed to import: say why, in one line
        raise TaskError(f"--reward {spec}: cannot import {module_name} ({type(e).__name__}: {_line(e)})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise TaskError(f"--reward {spec}: {module_name} has no function {name}")
    return fn


def _line(error):
    return (str(error).splitlines() or [""])[0]


def checked_reward(fn, label):
    """r(prompts, completions) -> (B,) float32 tensor from a user reward, with one-line errors."""
    def reward(prompts, completions):
        try:
            values = fn(list(prompts), list(completions))
        except Exception as e:
            raise RewardError(f"{label} raised {type(e).__name__}: {_line(e)}") from None
        try:
            r = torch.tensor([float(v) for v in values], dtype=torch.float32)
        except (TypeError, ValueError):
            raise RewardError(f"{label} must return a list of numbers, one per completion "
                              f"(got {type(values).__name__})") from None
        if r.shape != (len(prompts),):
            raise RewardError(f"{label} returned {r.numel()} values for {len(prompts)} completions")
        if not torch.isfinite(r).all():
            raise RewardError(f"{label} returned a non-finite value ({r[~torch.isfinite(r)][0].item()})")
        return r
    return reward


class RewardModel:
    """A Hugging Face sequence-classification reward model (e.g. a Gemma RM): r(x, y) = its one logit on
    the text x + y. Batched, on the policy's device, in bf16 if the checkpoint is. Needs transformers."""

    def __init__(self, path, device, batch_size=16):
        try:
            import transformers
        except ImportError:
            raise TaskError("--reward-model needs the optional transformers package "
                            "(pip install 'warp-min[reward-model]' or pip install transformers)") from None
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise TaskError(f"--reward-model {path}: no config.json (a Hugging Face model directory is expected)")
        try:   # local files only, and never code that came with the checkpoint
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                                        trust_remote_code=False)
            self.model = transformers.AutoModelForSequenceClassification.from_pretrained(
                path, local_files_only=True, trust_remote_code=False, dtype="auto", use_safetensors=True).to(device)
        except (OSError, ValueError, KeyError) as e:
            raise TaskError(f"--reward-model {path}: cannot load it ({type(e).__name__}: {_line(e)})") from None
        if self.model.config.num_labels != 1:
            raise TaskError(f"--reward-model {path}: has {self.model.config.num_labels} outputs; a reward model has 1")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"   # the classifier reads the last non-pad token
        self.model.eval().requires_grad_(False)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, prompts, completions):
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            texts = [p + c for p, c in zip(prompts[start:start + self.batch_size],
                                           completions[start:start + self.batch_size])]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
            scores += self.model(**batch).logits[:, 0].float().cpu().tolist()
        return scores


# ----------------------------------------------------------------------------------------------
# The task.
# ----------------------------------------------------------------------------------------------


def make_task(cfg):
    """The Task of a run's settings; every user input is checked here, before any training or output."""
    tok = ToyTokenizer()
    if cfg.init:
        try:
            tok = hf_tokenizer.load(cfg.init, chat_template=cfg.chat_template)
        except ValueError as e:
            raise TaskError(f"--init {cfg.init}: {e}") from None
    elif cfg.chat_template:
        raise TaskError("--chat-template needs --init DIR (the toy model has no chat template)")
    if cfg.reward and cfg.reward_model:
        raise TaskError("--reward and --reward-model: pass one of them")
    task = W.toy_task()
    task.tokenizer = tok
    if cfg.prompts:
        train, held_out = split_prompts(read_prompts(cfg.prompts), cfg.eval_prompts, cfg.prompts)
        task.train_prompts = lambda n, rng: [rng.choice(train) for _ in range(n)]
        task.eval_prompts = lambda n: held_out[:n]
        task.quality = None          # grammaticality is defined for the toy's review prompts only
    if cfg.reward or cfg.reward_model:
        label = f"--reward {cfg.reward}" if cfg.reward else f"--reward-model {cfg.reward_model}"
        fn = load_function(cfg.reward) if cfg.reward else RewardModel(cfg.reward_model, W.resolve_device(cfg.device))
        task.reward, task.breakdown = checked_reward(fn, label), None
        try:   # a first call, before any work: the signature and what it returns
            task.reward(task.eval_prompts(2), ["", ""])
        except RewardError as e:
            raise TaskError(str(e)) from None
    return task
