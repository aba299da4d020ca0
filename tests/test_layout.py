"""The layout holds (docs/architecture.md): the learner's core never depends on the scale-up package,
nothing imports in a cycle, the package installs what it needs, and the production loop
(warp_scale/driver.py) computes exactly what warp_min.warp computes."""

import ast
import json
import os
import sys


import pytest
import torch
from safetensors.torch import load_file

import warp_min as W

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what may import what: a module imports only from its own layer or a lower one
LAYERS = {"model": 0, "reward": 1, "toy_tasks": 1, "warp_min": 2, "warp_scale": 3, "experiments": 4}


def project_modules():
    """{dotted module name: file} for every project module outside tests/."""
    modules = {}
    for top in LAYERS:
        if os.path.isfile(os.path.join(ROOT, top + ".py")):
            modules[top] = os.path.join(ROOT, top + ".py")
            continue
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
                    modules[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    return modules


def _is_main_block(node):
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def imports(path, module):
    """[(imported project module, line, at module level?)], everything but `if __name__ == "__main__":`
    blocks and the two lazy loader methods of model.Transformer (the documented exceptions)."""
    tree = ast.parse(open(path).read())
    skipped = set()
    for node in ast.walk(tree):
        if _is_main_block(node) or (module == "model" and isinstance(node, ast.FunctionDef)
                                    and node.name in ("from_pretrained", "save_pretrained")):
            skipped |= {id(n) for n in ast.walk(node)}
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in LAYERS:
                found.append((name, node.lineno, id(node) in top_level))
    return found


def import_graph():
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name, _, _ in imports(path, module):
            while name and name not in modules:        # `from pkg import submodule` or `from mod import name`
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def test_no_import_cycles():
    """No project module reaches itself through imports, at module level or inside functions."""
    graph = import_graph()
    state = {}

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert "warp_scale.driver" in graph["warp_scale.cli"]      # the walk sees real edges


def test_imports_go_down_the_layers():
    """experiments -> warp_scale -> warp_min -> model, reward, toy_tasks: never back up."""
    graph = import_graph()
    upward = [(m, t) for m, targets in graph.items() for t in targets
              if LAYERS[t.split(".")[0]] > LAYERS[m.split(".")[0]]]
    assert not upward, upward
    assert graph["warp_min"] and all(t.split(".")[0] in ("model", "reward", "toy_tasks") for t in graph["warp_min"])


def test_model_imports_only_the_standard_library_and_torch():
    tree = ast.parse(open(os.path.join(ROOT, "model.py")).read())
    names = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in tree.body if isinstance(n, ast.ImportFrom)]
    assert names and all(n.split(".")[0] in sys.stdlib_module_names or n.split(".")[0] == "torch" for n in names), names


def test_the_core_stays_readable_in_one_sitting():
    """Issue 11: warp_min.py is Algorithm 1 in about 450 lines, with a warp() loop of about 40 in which
    runs -> SLERP -> LITI read directly, and no rank, resume, checkpoint or bf16 branch on its path."""
    source = open(os.path.join(ROOT, "warp_min.py")).read()
    assert len(source.splitlines()) <= 475
    tree = ast.parse(source)
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    loop = functions["warp"]
    assert loop.end_lineno - loop.lineno + 1 <= 40
    names = {n.id for f in (loop, functions["train_policy"]) for n in ast.walk(f) if isinstance(n, ast.Name)}
    assert {"train_policy", "slerp", "liti"} <= names
    assert not {n for n in names if any(w in n.lower() for w in ("rank", "world", "resume", "checkpoint", "bf16"))}


def test_pyproject_installs_every_module_and_the_tokenizer_ranks():
    """`pip install .` ships the core modules, both packages and the tokenizer's ranks file."""
    tomllib = pytest.importorskip("tomllib")     # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    setuptools = project["tool"]["setuptools"]
    assert set(setuptools["py-modules"]) == {"warp_min", "model", "reward"}
    assert set(setuptools["packages"]) == {"toy_tasks", "warp_scale"}
    assert "reviews.tiktoken" in setuptools["package-data"]["toy_tasks"]
    scripts = project["project"]["scripts"]
    assert scripts["warp-min"] == "warp_scale.cli:main" and scripts["warp-min-merge"] == "warp_scale.merge:main"
    top_level = {n[:-3] for n in os.listdir(ROOT) if n.endswith(".py")} | {
        n for n in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, n, "__init__.py"))}
    assert top_level == {"warp_min", "model", "reward", "toy_tasks", "warp_scale", "experiments"}, top_level


def test_production_loop_equals_warp_min_warp_bit_for_bit(tmp_path):
    """On the CPU in fp32 with one process, warp_scale.driver.run (checkpoints every 2 steps, resume
    plumbing, skip checks, outputs) writes the same final weights, bit for bit, and the same metric
    rows (timings aside) as warp_min.warp followed by warp_min.plain_rl."""
    from warp_scale import driver
    from warp_scale.cli import RunConfig
    torch.set_num_threads(1)
    cfg = RunConfig(n_layer=2, d_model=32, n_head=2, n_kv_head=1, head_dim=16, d_ff=64, sft_steps=20, sft_docs=300,
                    iterations=2, runs=2, steps=4, prompts_per_step=1, samples_per_prompt=3, log_every=2,
                    eval_every=2, eval_prompts=4, eval_samples=1, max_new_tokens=10, etas="0,1", device="cpu",
                    threads=1, checkpoint_every=2, front_samples=0, out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"))
    task, net = W.toy_task(), W.toy_network(cfg)
    theta_sft = W.toy_theta_sft(cfg, cfg.cache_dir, log=lambda s: None)
    rows = []
    final = W.warp(cfg, task, net, theta_sft, log=lambda s: None, emit=rows.append)
    W.plain_rl(cfg, task, net, theta_sft, log=lambda s: None, emit=rows.append)

    driver.run(cfg, task, log=lambda s: None)
    written = load_file(os.path.join(cfg.out, "final.safetensors"))
    assert written.keys() == final.keys()
    assert all(torch.equal(written[k], final[k]) for k in final)
    logged = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]

    def untimed(rows):
        return [{k: v for k, v in row.items() if k != "tok_s"} for row in rows]
    assert untimed(logged) == untimed(rows)
    assert {r["kind"] for r in rows} == {"eval", "train", "trajectory", "front", "cosine"}
    assert sum(r["kind"] == "front" for r in rows) == 4 and max(r["iteration"] for r in rows) == 2
