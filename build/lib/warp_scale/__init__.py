"""warp_scale: the machinery that runs warp_min's functions at scale. It imports the core
(warp_min, model, reward, toy_tasks); the core never imports it (see docs/architecture.md).

    cli.py          `python warp_min.py` / `warp-min`: flags, presets, validation, the demo's outputs
    driver.py       the production loop: warp_min.warp plus resume, torchrun ranks, bf16, skipped steps
    tasks.py        your prompts and reward: --prompts FILE, --reward module:function, --reward-model DIR
    hf.py           Hugging Face checkpoint directories: config.json <-> ModelConfig, safetensors
    tokenizer.py    a checkpoint's tokenizer.json (stop ids, chat template)
    merge.py        `warp-min-merge`: the streaming two-pass merge of safetensors checkpoints
    distributed.py  the M runs of an iteration on torchrun ranks
    resume.py       crash-safe checkpoints for --resume
    mixed.py        bf16 policies with fp32 master weights and an fp32 EMA anchor
"""
