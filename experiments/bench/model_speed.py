"""Speed of our Transformer vs transformers' GemmaForCausalLM, same config and same weights.

    python experiments/bench/model_speed.py                 # toy default ModelConfig, CPU
    python experiments/bench/model_speed.py --threads 1     # what RL on a busy CPU box sees

Measures, in one run and interleaved (ours, theirs, ours, ...) so machine load hits both alike:
- training tokens/s: forward + backward of next-token cross-entropy on a (batch, seq_len) batch,
- sampling tokens/s: generating new_tokens per row at temperature 1 with each side's KV cache
  (ours: Transformer.generate; theirs: generate(do_sample=True, top_k=0), min_new_tokens so both
  produce exactly the same number of tokens),
and prints medians and the ratio ours / transformers (> 1 means ours is faster).
"""

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import ModelConfig, Transformer  # noqa: E402


@dataclass
class Args:
    batch: int = 16          # rows per training batch and per sampling call
    seq_len: int = 64        # training sequence length
    prompt_len: int = 8      # sampling prompt length
    new_tokens: int = 48     # tokens sampled per row
    repeats: int = 7         # timed repetitions per side (median reported), after one warm-up
    threads: int = 0         # torch intra-op threads; 0 = torch's default
    seed: int = 0


def train_step(forward, idx):
    """One forward + backward of next-token cross-entropy; forward(idx) -> logits."""
    logits = forward(idx[:, :-1])
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
    loss.backward()


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Args):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=f.type, default=f.default)
    args = Args(**vars(parser.parse_args()))
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()

    cfg = ModelConfig()
    ours = Transformer(cfg, generator=torch.Generator().manual_seed(args.seed))
    with tempfile.TemporaryDirectory() as tmp:  # the same weights, through our save_pretrained
        ours.save_pretrained(tmp)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp)
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = 0
    print(f"config: {cfg}")
    print(f"transformers {transformers.__version__} {type(theirs).__name__} "
          f"(attn_implementation={theirs.config._attn_implementation}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")

    g = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g)
    prompt = batch[:, :args.prompt_len]
    with torch.no_grad():  # sanity: the two models are the same function
        gap = (ours(batch) - theirs(batch).logits).abs().max().item()
    print(f"max |logit difference| = {gap:.2e}")

    def sample_ours():
        ours.generate(prompt, args.new_tokens, temperature=1.0, generator=g)

    def sample_theirs():
        theirs.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0, top_p=1.0,
                        temperature=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    benches = {
        "train": (lambda: train_step(ours, batch), lambda: train_step(lambda x: theirs(x).logits, batch),
                  args.batch * args.seq_len),
        "sample": (sample_ours, sample_theirs, args.batch * args.new_tokens),
    }
    print(f"{'':8}{'ours tok/s':>14}{'transformers tok/s':>20}{'ratio':>8}")
    for name, (fn_ours, fn_theirs, n_tokens) in benches.items():
        times = {"ours": [], "theirs": []}
        for rep in range(args.repeats + 1):
            for side, fn in (("ours", fn_ours), ("theirs", fn_theirs)):
                seconds = timed(fn)
                if rep > 0:  # the first repetition is a warm-up
                    times[side].append(seconds)
        ours_tps = n_tokens / statistics.median(times["ours"])
        theirs_tps = n_tokens / statistics.median(times["theirs"])
        print(f"{name:8}{ours_tps:14.0f}{theirs_tps:20.0f}{ours_tps / theirs_tps:8.2f}")
        ours.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
