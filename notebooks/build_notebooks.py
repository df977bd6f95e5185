"""Writes the tutorial notebooks from plain cell lists (so they diff and review as code).

    python notebooks/build_notebooks.py
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

TOUR = [
    ("markdown", """# hf_pp in one sitting: plan, split, train, reload

This notebook runs on a laptop CPU. It (1) plans a pipeline layout for a model
without loading any weights, (2) draws the schedules you can pick from,
(3) launches a real 2-rank pipeline fine-tune with `torchrun` (a notebook kernel
is a single process, so training happens in child processes), and (4) loads the
saved model back here, in one process, as an ordinary Hugging Face model."""),
    ("code", """import os, subprocess, sys
ROOT = os.path.abspath(os.path.join(os.getcwd(), "..")) if os.path.basename(os.getcwd()) == "notebooks" else os.getcwd()
sys.path.insert(0, os.path.join(ROOT, "examples"))
import torch
from transformers import LlamaConfig
from hf_pp.planner import meta_model, plan_pipeline, format_plan"""),
    ("markdown", """## 1. Plan a layout before renting machines
`meta_model` builds the model on the meta device (no memory for weights).
`plan_pipeline` shows what each stage holds, the weight + gradient + AdamW
memory per rank, and the bubble the schedule leaves."""),
    ("code", """config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=4)
plan = plan_pipeline(meta_model(config), pp_size=4, schedule="1f1b", n_microbatches=8)
print(format_plan(plan))"""),
    ("markdown", """The first and last stages carry the embeddings and the LM head: with a
32k vocabulary they are visibly heavier. An interleaved schedule gives every
rank two smaller stages and a smaller bubble:"""),
    ("code", """plan = plan_pipeline(meta_model(config), pp_size=4, schedule="interleaved_1f1b", n_microbatches=8,
                     picture="interleaved.png")
print(f"bubble: {plan.expected_bubble:.1%}; picture written to interleaved.png")"""),
    ("markdown", """## 2. Train across 2 pipeline stages
`examples/train_pp.py` is an ordinary Trainer script with `PipelineTrainer` and
`PipelineTrainingArguments(pp_size=2)`. Each rank holds half of the layers."""),
    ("code", """out_dir = os.path.join(ROOT, "outputs", "notebook")
cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
       os.path.join(ROOT, "examples", "train_pp.py"), "--output_dir", out_dir, "--max_steps", "20",
       "--eval_steps", "10", "--disable_tqdm", "true"]
run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
print(run.stdout[-600:] if run.returncode == 0 else run.stderr[-3000:])"""),
    ("markdown", """## 3. The result is an ordinary Hugging Face model
Every rank wrote its own stage's shard; the directory loads in one process."""),
    ("code", """from transformers import AutoModelForCausalLM
from tiny_data import char_tokenizer, decode_chars
model = AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, "final")).eval()
tok = char_tokenizer()
ids = torch.tensor([[tok.bos_token_id] + tok("3 plus 4 is", add_special_tokens=False)["input_ids"]])
out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
print(repr(decode_chars(tok, out[0, ids.shape[1]:].tolist())))"""),
]


def notebook(cells):
    def cell(kind, text):
        lines = text.splitlines(keepends=True)
        base = {"cell_type": kind, "metadata": {}, "source": lines}
        return {**base, "execution_count": None, "outputs": []} if kind == "code" else base

    return {"cells": [cell(k, t) for k, t in cells], "metadata": {"kernelspec": {"display_name": "Python 3",
            "language": "python", "name": "python3"}, "language_info": {"name": "python"}}, "nbformat": 4,
            "nbformat_minor": 5}


if __name__ == "__main__":
    path = os.path.join(HERE, "tour.ipynb")
    with open(path, "w") as f:
        json.dump(notebook(TOUR), f, indent=1)
        f.write("\n")
    print("wrote", path)
