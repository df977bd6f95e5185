"""Writes the tutorial notebooks from plain cell lists (so they diff and review as code), executes them and
saves them with their outputs.

    .venv/bin/python notebooks/build_notebooks.py                  # every notebook
    .venv/bin/python notebooks/build_notebooks.py plan_a_split     # one of them

The cells run with nbclient in a Jupyter kernel of *this* interpreter (the venv's python): a kernelspec naming
``sys.executable`` is written to a temporary directory put first on ``JUPYTER_PATH``, so nothing is installed
into the user's Jupyter directories (no ``ipykernel install``) and the kernel sees the venv's packages.
tests/test_notebooks.py executes the committed notebooks the same way (to a temporary copy).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

import nbformat
import zmq
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient
from traitlets.config import Config

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_NAME = "hf-pp-python"
CELL_TIMEOUT_S = 600

# Shared by both notebooks: where the checkout is (make setup installs it with pip install -e) and where the
# notebook writes its files; the tests point HF_PP_NOTEBOOK_OUT at a temporary directory.
SETUP = """import os
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook bars need ipywidgets; unused here
import hf_pp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(hf_pp.__file__)))
OUT = os.environ.get("HF_PP_NOTEBOOK_OUT") or os.path.join(ROOT, "outputs", "notebooks", "{name}")
os.makedirs(OUT, exist_ok=True)"""

PLAN_A_SPLIT = [
    ("markdown", """# Plan and inspect a pipeline split, without weights

Everything here runs in this one kernel process, on the CPU, in seconds. The model is built on the *meta*
device (shapes and dtypes, no memory), split by the same planning code `PipelineTrainer` uses, and the
schedules are simulated, not run. Use it to choose `pp_size`, the schedule, the number of microbatches and
`pp_balance` before you rent machines. (`python -m hf_pp plan ...` prints the same report from a shell.)"""),
    ("code", SETUP.format(name="plan_a_split") + """

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display
from PIL import Image as PILImage
from transformers import LlamaConfig

from hf_pp.layout import compact_fqns, expected_bubble_fraction
from hf_pp.planner import format_plan, meta_model, plan_pipeline
from hf_pp.visualize import bubble_of, draw_schedule, schedule_ops, simulate"""),
    ("markdown", """## 1. The planner: what each stage holds
A Llama of 1.1B parameters (TinyLlama's shape) on the meta device, planned over 4 pipeline ranks with 1F1B
and 8 microbatches, layers spread evenly (`balance="layers"`; the default, `"auto"`, is section 4's subject).
`format_plan` lists every stage's modules, parameters, and the memory of weights +
gradients + AdamW state, per stage and per rank, and the bubble the schedule leaves."""),
    ("code", """config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)
model = meta_model(config)
n_params = sum(p.numel() for p in model.parameters())
print(f"{n_params:,} parameters on the {next(model.parameters()).device} device\\n")
plan = plan_pipeline(model, pp_size=4, schedule="1f1b", n_microbatches=8, balance="layers")
print(format_plan(plan))"""),
    ("markdown", """The same facts as a table. `plan.facts[s].params` counts the parameters of stage `s` (a tied weight
once, so the stages add up to the model); `plan.stage_memory(s)` gives weights, gradients and AdamW state
in bytes. 22 layers do not divide by 4: the extra layers go to the middle stages, because the first stage
also runs the embeddings and the last one the norm, the head and the loss."""),
    ("code", """def stage_table(plan):
    rank_of = {s: r for r, ids in enumerate(plan.stage_ids_per_rank) for s in ids}
    rows = []
    for s, fqns in enumerate(plan.fqns_per_stage):
        mem = plan.stage_memory(s)
        rows.append({"stage": s, "rank": rank_of[s], "layers": sum(".layers." in f for f in fqns),
                     "params (M)": plan.facts[s].params / 1e6, "weights (MiB)": mem["weights"] / 2**20,
                     "+ grads + AdamW (MiB)": mem["total"] / 2**20, "modules": ", ".join(compact_fqns(fqns))})
    return pd.DataFrame(rows).set_index("stage")


assert sum(f.params for f in plan.facts) == n_params  # nothing lost, nothing counted twice
stage_table(plan).round(1)"""),
    ("markdown", """## 2. Schedules side by side
Every built-in schedule on 4 ranks with 8 microbatches, placed in time by `hf_pp.visualize.simulate` from
the order torch runs (forward = 1 unit, full backward = 2; split backwards are an input-gradient half I
and a weight-gradient half W of 1 unit each). The interleaved, looped and V-shaped schedules hold 2 stages
per rank, each with half the layers, so their operations are drawn half as long: one time axis, the same
model, and the length of the step is comparable across schedules. Zero-bubble schedules fill the idle time
with deferred weight gradients."""),
    ("code", """SCHEDULES = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2, "looped_bfs": 2, "interleaved_zero_bubble": 2,
             "zbv_zero_bubble": 2, "dual_pipe_v": 2}  # name -> stages per rank
COLORS = {"F": "#4C72B0", "B": "#DD8452", "I": "#C44E52", "W": "#55A868"}
p, m = 4, 8
timelines = {name: simulate(schedule_ops(name, p, m, v)) for name, v in SCHEDULES.items()}
fig, axes = plt.subplots(len(timelines), 1, figsize=(11, 1.3 * len(timelines)), sharex=True)
for ax, (name, rows) in zip(axes, timelines.items()):
    scale = 1 / SCHEDULES[name]  # a rank's v stages share its layers
    for rank, row in enumerate(rows):
        ax.broken_barh([(s.start * scale, s.duration * scale) for s in row], (p - 1 - rank + 0.05, 0.9),
                       facecolors=[COLORS[s.op.kind] for s in row], edgecolor="white", linewidth=0.4)
    length = max(s.start + s.duration for row in rows for s in row) * scale
    ax.set_title(f"{name}: step of {length:g} time units, bubble {bubble_of(rows):.1%}", loc="left", fontsize=9)
    ax.set_yticks([p - 1 - r + 0.5 for r in range(p)], [f"rank {r}" for r in range(p)], fontsize=7)
    ax.set_facecolor("#f3f3f3")
axes[-1].set_xlabel("time (forward of one rank's share of the layers = 1 unit); grey = idle")
fig.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()],
           labels=["forward", "backward", "backward, input grad", "backward, weight grad"], loc="upper right",
           ncol=4, fontsize=8, frameon=False)
fig.tight_layout(rect=(0, 0, 1, 0.97))
plt.show()"""),
    ("markdown", """## 3. Bubble vs number of microbatches
The idle share of a step falls as microbatches are added: (p-1)/(m+p-1) for GPipe and 1F1B,
(p-1)/(v·m+p-1) with v stages per rank for interleaved schedules. Lines: these formulas
(`hf_pp.layout.expected_bubble_fraction`); markers: the simulated schedules. Zero-bubble schedules beat
the formula; the price is memory for deferred weight gradients. More microbatches means smaller ones:
per-microbatch overheads grow, so there is a sweet spot on real hardware. (Schedules with the same bubble
share markers: GPipe and 1F1B, interleaved 1F1B and looped BFS, the three zero-bubble ones.)"""),
    ("code", """p = 4
ms = [8, 12, 16, 24, 32, 48, 64]
simulated = {name: [bubble_of(simulate(schedule_ops(name, p, m, v))) for m in ms] for name, v in SCHEDULES.items()}
fig, ax = plt.subplots(figsize=(7.5, 4))
for v, style in ((1, "-"), (2, "--")):
    ax.plot(ms, [expected_bubble_fraction(p, m, v) for m in ms], style, color="black", lw=1,
            label=f"expected, v={v}: (p-1)/({'v·' if v > 1 else ''}m+p-1)")
for (name, values), marker in zip(simulated.items(), "osD^vP*"):
    ax.plot(ms, values, marker, ms=5, alpha=0.8, label=f"simulated {name}")
ax.set(xlabel="microbatches per step (m)", ylabel="bubble (idle share of the step)", title=f"p = {p} ranks",
       ylim=(0, None))
ax.grid(alpha=0.3)
ax.legend(fontsize=7.5)
fig.tight_layout()
fig.savefig(os.path.join(OUT, "bubble_vs_microbatches.png"), dpi=100)
plt.show()
pd.DataFrame(simulated, index=pd.Index(ms, name="m")).map(lambda b: f"{b:.1%}")"""),
    ("markdown", """## 4. `pp_balance="params"` vs `"layers"` on a large vocabulary
With a 128k vocabulary (Llama 3.2 1B's shape, untied) the embedding and the head each hold 263M parameters,
as much as four decoder layers. `"layers"` gives every stage the same number of layers, so the
end stages carry far more. `"params"` moves the cuts to balance the parameters (memory) each stage
holds; `"time"` would balance measured forward + backward time instead (it profiles, so it is left to
`python -m hf_pp plan ... --balance time`)."""),
    ("code", """big = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
big_model = meta_model(big)
plans = {mode: plan_pipeline(big_model, pp_size=4, schedule="1f1b", n_microbatches=8, balance=mode)
         for mode in ("layers", "params")}
tables = {mode: stage_table(plan) for mode, plan in plans.items()}
summary = pd.concat({f'pp_balance="{mode}"': t[["layers", "params (M)", "+ grads + AdamW (MiB)"]]
                     for mode, t in tables.items()}, axis=1)
summary.round(0)"""),
    ("code", """fig, ax = plt.subplots(figsize=(7, 3.5))
width = 0.38
for i, (mode, t) in enumerate(tables.items()):
    bars = ax.bar(t.index + (i - 0.5) * width, t["params (M)"], width, label=f'pp_balance="{mode}"')
    ax.bar_label(bars, labels=[f"{n} layers" for n in t["layers"]], fontsize=7)
ax.axhline(sum(f.params for f in plans["layers"].facts) / 4e6, color="black", lw=1, ls=":", label="perfect balance")
ax.set(xlabel="stage", ylabel="parameters (M)", xticks=range(4), title="1.5B Llama, vocab 128k, pp=4")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
largest = {mode: max(f.params for f in plan.facts) for mode, plan in plans.items()}
print(f"largest stage: {largest['layers'] / 1e6:.0f}M parameters with 'layers', {largest['params'] / 1e6:.0f}M with "
      f"'params' ({1 - largest['params'] / largest['layers']:.0%} less memory on the fullest rank)")"""),
    ("markdown", """The balanced plan prints its cost per stage against the even split:"""),
    ("code", """print(format_plan(plans["params"]))"""),
    ("markdown", """## 5. The labelled schedule pictures
`hf_pp.visualize.draw_schedule` draws one schedule with every cell labelled (kind, microbatch, stage):
the picture that `trainer.visualize_current_schedule(...)`, `AutoPipeline.visualize_current_schedule(...)` and the
planner's `picture=` write. One PNG per schedule of section 2. (It switches matplotlib to its file-only
backend, which ends inline plots in a notebook: draw these pictures after your own plots.)"""),
    ("code", """pictures = {}
for name, v in SCHEDULES.items():
    pictures[name] = draw_schedule(schedule_ops(name, p, m, v), os.path.join(OUT, f"schedule_{name}.png"),
                                   title=f"{name}, pp={p}, {m} microbatches")
print("wrote", ", ".join(os.path.basename(f) for f in pictures.values()))
picture = PILImage.open(pictures["zbv_zero_bubble"])
picture.thumbnail((1400, 1400))  # smaller to show here; the file keeps its full size
display(picture)"""),
    ("markdown", """Next: `pipelined_finetune.ipynb` trains a small model over 2 pipeline stages from a notebook. In a
training script the same choices are `PipelineTrainingArguments(pp_size=4, pp_schedule="interleaved_1f1b",
pp_balance="params", ...)`."""),
]

PIPELINED_FINETUNE = [
    ("markdown", """# A pipelined fine-tune launched from a notebook: train, plot the loss, reload, generate

A Jupyter kernel is one process and a pipeline needs one process per stage, so the notebook starts
`torchrun` as a child process, as you would in a terminal. `examples/train_pp.py` is an ordinary
Trainer script with `PipelineTrainer` and `pp_size=2`: an 8-layer Llama with a character tokenizer on the
shipped corpus (no downloads), fully trained over 2 pipeline stages, about half a minute on 2 CPU cores.
The result is one ordinary Hugging Face directory, loaded back here in this single process."""),
    ("code", SETUP.format(name="pipelined_finetune") + """

import json
import shutil
import subprocess
import sys
import time

import datasets
import matplotlib.pyplot as plt
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling
from transformers.utils import logging as hf_logging

sys.path.insert(0, os.path.join(ROOT, "examples"))
from tiny_data import corpus_dataset, decode_chars  # the shipped corpus; tokens are characters

hf_logging.disable_progress_bar()  # progress bars of loading and tokenizing: noise in a notebook
datasets.disable_progress_bars()"""),
    ("markdown", """## 1. Launch 2 pipeline ranks with torchrun
Any `TrainingArguments` / `PipelineTrainingArguments` flag works on the command line. Saving a
checkpoint at the last step writes `trainer_state.json`, the Trainer's own log history, read below.
`--standalone` picks a free port; one thread per rank suits 2 ranks on 2 cores."""),
    ("code", """STEPS = 150
args = ["--output_dir", "train", "--max_steps", str(STEPS), "--logging_steps", "5", "--eval_steps", "50",
        "--save_strategy", "steps", "--save_steps", str(STEPS), "--disable_tqdm", "true"]
print("torchrun --standalone --nproc-per-node 2 examples/train_pp.py", " ".join(args))
cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
       os.path.join(ROOT, "examples", "train_pp.py"), *args]
shutil.rmtree(os.path.join(OUT, "train"), ignore_errors=True)  # a fresh run, no checkpoint of an earlier one
start = time.time()
run = subprocess.run(cmd, cwd=OUT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                     timeout=900)
if run.returncode != 0:
    raise RuntimeError(f"torchrun exited with {run.returncode}:\\n{run.stderr[-4000:]}")
print(f"done in {time.time() - start:.0f} s; rank 0's last line:")
print(run.stdout.strip().splitlines()[-1])"""),
    ("markdown", """## 2. The loss, from the Trainer's log
`log_history` holds what rank 0 logged: the training loss of every whole batch (computed on the last
stage and shared across the pipeline) and the evaluation loss, computed by forward-only passes through
the stages."""),
    ("code", """with open(os.path.join(OUT, "train", f"checkpoint-{STEPS}", "trainer_state.json")) as f:
    history = json.load(f)["log_history"]
train = [(h["step"], h["loss"]) for h in history if "loss" in h]
evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(*zip(*train), marker=".", label="training loss")
ax.plot(*zip(*evals), marker="o", label="evaluation loss")
ax.set(xlabel="optimizer step", ylabel="cross-entropy per token", title="Full fine-tune over 2 pipeline stages")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(OUT, "loss.png"), dpi=100)
plt.show()
print(f"training loss {train[0][1]:.3f} at step {train[0][0]} -> {train[-1][1]:.3f} at step {train[-1][0]}; "
      f"evaluation loss {evals[-1][1]:.4f}")"""),
    ("markdown", """## 3. One ordinary Hugging Face directory
`save_model` ran on both ranks: each wrote the shard of its own stage, under the unsplit model's names,
and one index maps every tensor to its shard."""),
    ("code", """final = os.path.join(OUT, "train", "final")
with open(os.path.join(final, "model.safetensors.index.json")) as f:
    weight_map = json.load(f)["weight_map"]
for shard in sorted(set(weight_map.values())):
    names = [n for n, s in weight_map.items() if s == shard]
    layers = sorted({int(n.split(".")[2]) for n in names if n.startswith("model.layers.")})
    others = sorted({n.rsplit(".", 1)[0] for n in names if not n.startswith("model.layers.")})
    print(f"{shard}: {len(names)} tensors: layers {layers[0]}-{layers[-1]}, {', '.join(others)}")"""),
    ("markdown", """`from_pretrained` loads it in one process, no pipeline. Checked: the evaluation loss of the reloaded
model on the same held-out lines (the example's split and batches) equals what the pipeline reported."""),
    ("code", """model = AutoModelForCausalLM.from_pretrained(final).eval()
tokenizer = AutoTokenizer.from_pretrained(final)
held_out = corpus_dataset(tokenizer).train_test_split(test_size=64, seed=0)["test"]
collate = DataCollatorForLanguageModeling(tokenizer, mlm=False, pad_to_multiple_of=8)
with torch.no_grad():
    batch_losses = [model(**collate([held_out[i] for i in range(b, b + 8)])).loss.item() for b in range(0, 64, 8)]
reloaded_eval = sum(batch_losses) / len(batch_losses)
print(f"evaluation loss: pipeline {evals[-1][1]:.5f}, reloaded in one process {reloaded_eval:.5f}")"""),
    ("code", """for prompt in ["7 plus 7 is", "count: 3 4 5", "two comes before"]:
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    print(f"{prompt!r} -> {decode_chars(tokenizer, out[0, ids.shape[1]:].tolist())!r}")"""),
    ("markdown", """A tiny model after 150 steps: fluent in the corpus' format, weak at arithmetic. Next, teach it a
new task with LoRA over the same 2 stages (what `make demo` does after this training):
`torchrun --nproc-per-node 2 examples/finetune_lora.py --base_model train/final`."""),
]

NOTEBOOKS = {"plan_a_split": PLAN_A_SPLIT, "pipelined_finetune": PIPELINED_FINETUNE}


def notebook(name: str, cells) -> nbformat.NotebookNode:
    """A notebook of ``cells`` ((kind, source) pairs) with stable cell ids, so a rebuild diffs cleanly."""
    new = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    nb = nbformat.v4.new_notebook(cells=[new[kind](source, id=f"{name}-{i}") for i, (kind, source) in enumerate(cells)])
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    return nb


@contextlib.contextmanager
def venv_kernel(extra_env: dict[str, str] | None = None):
    """A kernelspec for this interpreter, found through a temporary ``JUPYTER_PATH``; yields its name.

    Jupyter's runtime files and IPython's profile go to the same temporary directory, so executing a
    notebook writes nothing under the user's home; ``extra_env`` reaches the kernel's environment.
    """
    with tempfile.TemporaryDirectory(prefix="hf_pp_kernel_") as tmp:
        # argv: [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        write_kernel_spec(os.path.join(tmp, "kernels", KERNEL_NAME), overrides={"display_name": "hf_pp (this venv)"})
        env = {"JUPYTER_PATH": os.pathsep.join(filter(None, [tmp, os.environ.get("JUPYTER_PATH")])),
               "JUPYTER_RUNTIME_DIR": os.path.join(tmp, "runtime"), "IPYTHONDIR": os.path.join(tmp, "ipython"),
               "JUPYTER_PLATFORM_DIRS": "1", **(extra_env or {})}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield KERNEL_NAME
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def execute(nb: nbformat.NotebookNode, cwd: str, timeout: float = CELL_TIMEOUT_S,
            extra_env: dict[str, str] | None = None) -> nbformat.NotebookNode:
    """Run every cell of ``nb`` in place, in ``cwd`` (``timeout`` seconds per cell); raises on a failing cell."""
    kernelspec = nb.metadata.get("kernelspec")
    with venv_kernel(extra_env) as kernel_name:
        # CurveZMQ keys for the kernel's local TCP sockets when pyzmq has them (ipykernel warns otherwise).
        config = Config({"KernelManager": {"transport_encryption": "auto" if zmq.has("curve") else "disabled"}})
        NotebookClient(nb, timeout=timeout, kernel_name=kernel_name, record_timing=False, config=config,
                       resources={"metadata": {"path": cwd}}).execute()
    if kernelspec is not None:  # keep what Jupyter users open the notebook with
        nb.metadata["kernelspec"] = kernelspec
    return nb


def build(name: str) -> str:
    nb = execute(notebook(name, NOTEBOOKS[name]), cwd=HERE)
    path = os.path.join(HERE, f"{name}.ipynb")
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    for name in sys.argv[1:] or NOTEBOOKS:
        if name not in NOTEBOOKS:
            sys.exit(f"unknown notebook {name!r}; choose from {', '.join(NOTEBOOKS)}")
        print("wrote", build(name), flush=True)
