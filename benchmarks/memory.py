"""Per-rank peak memory when PipelineTrainer loads a model directory stage by stage.

A Llama whose fp32 weights are about 1 GB is saved to a temporary
directory, then trained for one step by ``PipelineTrainer(model=directory)``
with pp=2 and pp=4 (each rank builds the model on the meta device and reads
only its stages' tensors), and by the same trainer in one process (plain
``from_pretrained``). For every rank it prints the peak resident memory after
loading and after the first training step (AdamW), next to the same run with
an almost empty model (the fixed runtime baseline: Python, torch, transformers,
gloo). Target: load peak - baseline <= 1.15 x (full weights / pp).

Run: ``python benchmarks/memory.py`` (about 2 minutes on 2 cores);
``--layers/--hidden/--vocab`` choose another size, ``--pp 2 4`` the layouts.

``--model mixtral`` measures a mixture-of-experts model instead (8 experts, 2 routed per token), saved
by ``save_pretrained`` in its original per-expert layout: each rank reads only its stages' experts and
fuses them as transformers does (its target is per rank: 1.15 x the weights the rank holds).

``--resume`` also measures resuming: the one-step run saves a checkpoint (weights, optimizer state by
``torch.distributed.checkpoint``), and fresh processes resume it and train one more step; the table
gains the per-rank peak of that resume + step (each rank should read only its own parameters' state).

``--phases`` measures, per rank and in one process per rank, the peak above that process's own baseline
(its RSS before the build) of each phase of a run: build, first step, evaluation with ``compute_metrics`` (on
the full logits), save, 20 more steps at 20 distinct sequence lengths (the first of them, the run's second step,
also alone: the first step whose forward and backward run with AdamW's state alive); then a fresh process per
rank builds, reads the checkpoint back (weights + optimizer state, before any step) and trains one step.
Layouts ``--layouts pp2 pp4 pp2xdp2`` (pp=2 x dp=2 with FSDP), each next to the rank's own share (weights +
gradients + optimizer state it holds). Targets: every phase <= 1.15 x the share, resume <= 1.15 x a step
(e.g. ``--phases --layers 8 --hidden 512 --vocab 8192 --seq 48``).

``--peft lora`` also trains a LoRA adapter (r=8, all-linear, via
``PipelineTrainer(peft_config=...)``) on the same directory and layouts and
prints a second table: per-rank first-step peaks of LoRA against the full
fine-tune, each above its own baseline (e.g. ``--peft lora --pp 2``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_model_args, check_layout_args, peak_rss_mb, spawn_ranks  # noqa: E402

TARGET = 1.15
EMPTY_VOCAB = 256
LAYOUTS = {"pp2": (2, 1), "pp4": (4, 1), "pp2xdp2": (2, 2)}  # (pp_size, data-parallel replicas; FSDP when > 1)
LENGTHS = 20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, layers=18, hidden=1024, vocab=8192, seq=64)
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--model", choices=["llama", "mixtral"], default="llama",
                        help="the architecture: a dense Llama, or a Mixtral with 8 experts (2 routed per token)")
    parser.add_argument("--balance", default="layers", help="pp_balance used for the split, when supported")
    parser.add_argument("--resume", action="store_true",
                        help="also save a checkpoint and measure a resume from it + one step, per rank")
    parser.add_argument("--phases", action="store_true",
                        help="per-rank peaks of build, step, eval, save, 20 lengths and resume, against the share")
    parser.add_argument("--layouts", nargs="+", default=["pp2", "pp4", "pp2xdp2"], choices=sorted(LAYOUTS),
                        help="with --phases: the layouts measured")
    parser.add_argument("--peft", choices=["none", "lora"], default="none",
                        help="also measure LoRA (r=8, all-linear) training against the full fine-tune")
    args = parser.parse_args(argv)
    check_layout_args(parser, args, ("layers", "hidden", "vocab", "seq"), args.pp)
    if args.phases and args.seq < 2 * LENGTHS:
        parser.error(f"--phases runs {LENGTHS} lengths seq, seq-2, ...: --seq must be at least {2 * LENGTHS}")
    return args


def llama_config(layers: int, hidden: int, vocab: int):
    from transformers import LlamaConfig

    heads = max(1, hidden // 64)
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=(11 * hidden) // 4 // 64 * 64,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=512, tie_word_embeddings=False, use_cache=False)


def mixtral_config(layers: int, hidden: int, vocab: int):
    from transformers import MixtralConfig

    heads = max(1, hidden // 64)
    return MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=(11 * hidden) // 4 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
                         tie_word_embeddings=False, use_cache=False, output_router_logits=False)


MODEL_CONFIGS = {"llama": llama_config, "mixtral": mixtral_config}


def save_model(directory: str, config) -> float:
    """Write a randomly initialised model as a sharded safetensors checkpoint; return its size in MB."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory, max_shard_size="200MB")
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    del model
    return size


def lora_config():
    """The benchmarked adapter: LoRA r=8 on every linear layer (lm_head excluded, as PEFT does)."""
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)


def _train_one_step(rank, world, directory, out, pp, seq, balance, vocab, peft="none", resume=None):
    import torch
    from torch.utils.data import Dataset

    from hf_pp import PipelineTrainer, PipelineTrainingArguments

    class RandomTokens(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            ids = torch.randint(0, vocab, (seq,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    extra = {"pp_balance": balance} if balance != "layers" and pp > 1 else {}
    saving = {"save_strategy": "steps", "save_steps": 1} if resume is not None else {"save_strategy": "no"}
    args = PipelineTrainingArguments(
        output_dir=out, pp_size=pp, per_device_train_batch_size=2 * pp, max_steps=2 if resume else 1, use_cpu=True,
        report_to="none", disable_tqdm=True, logging_steps=1, **saving, **extra,
    )
    trainer = PipelineTrainer(model=directory, args=args, train_dataset=RandomTokens(),
                              peft_config=lora_config() if peft == "lora" else None)
    load_peak = peak_rss_mb()
    parts = trainer.model.parts if pp > 1 else [trainer.model]
    weights = sum(p.numel() * p.element_size() for part in parts for p in part.parameters()) / 2**20
    trainable = sum(p.numel() for part in parts for p in part.parameters() if p.requires_grad)
    trainer.train(resume_from_checkpoint=resume or None)
    return {"rank": rank, "load": load_peak, "step": peak_rss_mb(), "weights": weights, "trainable": trainable}


def measure(directory: str, pp: int, seq: int, balance: str, vocab: int, peft: str = "none",
            resume: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:  # one output_dir: every rank must get the same arguments
        ranks = spawn_ranks(_train_one_step, pp, directory, out, pp, seq, balance, vocab, peft,
                            "" if resume else None, timeout_s=1800)
        if resume:  # fresh processes: the peak of reading the checkpoint back and one more step
            checkpoint = os.path.join(out, "checkpoint-1")
            resumed = spawn_ranks(_train_one_step, pp, directory, out, pp, seq, balance, vocab, peft, checkpoint,
                                  timeout_s=1800)
            for r, again in zip(ranks, resumed):
                r["resume"] = again["step"]
        return ranks


def report(full_mb: float, runs: dict, baselines: dict) -> str:
    lines = [
        f"Model: {full_mb:.0f} MB of fp32 weights. Peaks are per rank, in MB; 'above base' subtracts the same run "
        "with an almost empty model.",
        "",
        "| layout | rank | weights held | load peak | base | load above base | target 1.15 x full/pp | "
        "met | 1.15 x held | met (held) | first-step peak | step above base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    resumed = all("resume" in r for ranks in runs.values() for r in ranks)
    if resumed:
        lines[2] += " resume + step above base |"
        lines[3] += "---|"
    for pp, ranks in runs.items():
        target = TARGET * full_mb / pp
        for r, base in zip(ranks, baselines[pp]):
            above, held = r["load"] - base["load"], TARGET * r["weights"]
            lines.append(
                f"| {'one process' if pp == 1 else f'pp={pp}'} | {r['rank']} | {r['weights']:.0f} | {r['load']:.0f} | "
                f"{base['load']:.0f} | {above:.0f} | {target:.0f} | {'yes' if above <= target else 'NO'} | "
                f"{held:.0f} | {'yes' if above <= held else 'NO'} | {r['step']:.0f} | {r['step'] - base['step']:.0f} |"
                + (f" {r['resume'] - base['step']:.0f} |" if resumed else "")
            )
    return "\n".join(lines)


def peft_report(full: dict, lora: dict, full_base: dict, lora_base: dict) -> str:
    """Per-rank first-step peaks of LoRA training next to the full fine-tune (MB, each above its own baseline)."""
    lines = [
        "LoRA (r=8, all-linear) against the full fine-tune, first-step peak per rank in MB; 'above base' subtracts "
        "the same run (same method) with an almost empty model.",
        "",
        "| layout | rank | full: trainable params | full: step peak | full: above base | LoRA: trainable params | "
        "LoRA: step peak | LoRA: above base | LoRA / full (above base) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pp in full:
        for f, lo, fb, lb in zip(full[pp], lora[pp], full_base[pp], lora_base[pp]):
            f_above, l_above = f["step"] - fb["step"], lo["step"] - lb["step"]
            ratio = f"{l_above / f_above:.2f}" if f_above > 0 else "n/a"
            lines.append(
                f"| {'one process' if pp == 1 else f'pp={pp}'} | {f['rank']} | {f['trainable']:,} | {f['step']:.0f} | "
                f"{f_above:.0f} | {lo['trainable']:,} | {lo['step']:.0f} | {l_above:.0f} | {ratio} |"
            )
    return "\n".join(lines)


def _phase_trainer(directory: str, out: str, pp: int, dp: int, seq: int, vocab: int, max_steps: int):
    """A PipelineTrainer over ``directory`` whose batch k holds samples of length ``seq - 2 * (k % LENGTHS)``
    (in order: the lengths each step sees are known, the same on every rank)."""
    import torch
    from torch.utils.data import Dataset, SequentialSampler

    from hf_pp import PipelineTrainer, PipelineTrainingArguments

    batch = 2 * pp

    class Lengths(Dataset):
        def __len__(self):
            return batch * (LENGTHS + 1)

        def __getitem__(self, i):
            length = seq - 2 * ((i // batch) % LENGTHS)
            ids = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    class InOrder(PipelineTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    extra = {"pp_data_parallel": "fsdp"} if dp > 1 else {}
    args = PipelineTrainingArguments(
        output_dir=out, pp_size=pp, per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
        max_steps=max_steps, use_cpu=True, report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="no",
        **extra,
    )
    eval_data = torch.utils.data.Subset(Lengths(), range(2 * batch))
    return InOrder(model=directory, args=args, train_dataset=Lengths(), eval_dataset=eval_data,
                   compute_metrics=accuracy)


def _held_mb(trainer) -> dict:
    """MB this rank holds of weights, gradients (one per trainable parameter) and optimizer state (FSDP: shards)."""
    import torch

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    params = [p for part in trainer.model.parts for p in part.parameters()]
    weights = sum(local(p).numel() * p.element_size() for p in params) / 2**20
    grads = sum(local(p).numel() * p.element_size() for p in params if p.requires_grad) / 2**20
    state = sum(local(v).numel() * v.element_size() for s in trainer.optimizer.state.values() for v in s.values()
                if torch.is_tensor(v)) / 2**20
    return {"weights": weights, "share": weights + grads + state}


def _phases_rank(rank, world, directory, out, pp, dp, seq, vocab, checkpoint):
    """One rank's phases; with ``checkpoint`` a fresh process resuming it (build, then resume + one step)."""
    from transformers import TrainerCallback

    from _common import release_freed_memory, reset_peak_rss

    release_freed_memory()
    base = peak_rss_mb()  # the runtime (Python, torch, transformers, process group) before any model
    peaks: dict[str, float] = {}

    def phase(name):  # the peak since the last phase ended, above the baseline
        peaks[name] = peak_rss_mb() - base
        reset_peak_rss()

    reset_peak_rss()
    trainer = _phase_trainer(directory, out, pp, dp, seq, vocab, max_steps=2 if checkpoint else LENGTHS + 1)
    phase("build")
    if checkpoint:
        class Loaded(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if "resume_load" not in peaks:  # weights and optimizer state are read before the first step
                    phase("resume_load")

        trainer.add_callback(Loaded())
        trainer.train(resume_from_checkpoint=checkpoint)
        phase("resume")
        return {"rank": rank, **peaks, **_held_mb(trainer)}

    class Phases(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                phase("step")
                control.should_evaluate = control.should_save = True  # after step 1 only: eval, then save
            elif state.global_step == 2:  # the lengths phase so far: step 2 alone (not reset: it goes on)
                peaks["step2"] = peak_rss_mb() - base

        def on_evaluate(self, args, state, control, **kwargs):
            phase("eval")

        def on_save(self, args, state, control, **kwargs):
            phase("save")

    trainer.add_callback(Phases())
    trainer.train()
    phase("lengths")
    return {"rank": rank, **peaks, **_held_mb(trainer), "schedules": len(trainer._pp._schedules)}


def measure_phases(directory: str, layout: str, seq: int, vocab: int) -> list[dict]:
    pp, dp = LAYOUTS[layout]
    with tempfile.TemporaryDirectory() as out:
        ranks = spawn_ranks(_phases_rank, pp * dp, directory, out, pp, dp, seq, vocab, None, timeout_s=3000)
        resumed = spawn_ranks(_phases_rank, pp * dp, directory, out, pp, dp, seq, vocab,
                              os.path.join(out, "checkpoint-1"), timeout_s=3000)
    for r, again in zip(ranks, resumed):
        r["resume_load"], r["resume"] = again["resume_load"], again["resume"]
    return ranks


PHASES = ("build", "step", "eval", "save", "step2", "lengths", "resume_load", "resume")


def above_empty(ranks: list[dict], empty: list[dict]) -> list[dict]:
    """Each phase less the same phase of the almost empty model (what the runtime itself takes in that phase)."""
    return [{**r, **{k: r[k] - e[k] for k in PHASES}} for r, e in zip(ranks, empty)]


def phases_report(full_mb: float, runs: dict) -> str:
    lines = [
        f"Model: {full_mb:.0f} MB of fp32 weights. Per rank, MB: the peak of each phase above the rank's RSS before "
        "the build, less the same phase of an almost empty model; 'share' is what the rank holds (weights + "
        "gradients + AdamW state, FSDP: its shards).",
        "",
        "| layout | rank | weights | share | build | first step | eval (compute_metrics) | save | second step | "
        f"{LENGTHS} lengths | resume (read) | resume + step | worst phase / share | resume (read) / first step | "
        "resume + step / second step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layout, ranks in runs.items():
        for r in ranks:
            worst = max(r[k] for k in PHASES)
            lines.append(
                f"| {layout} | {r['rank']} | {r['weights']:.0f} | {r['share']:.0f} | {r['build']:.0f} | "
                f"{r['step']:.0f} | {r['eval']:.0f} | {r['save']:.0f} | {r['step2']:.0f} | {r['lengths']:.0f} | "
                f"{r['resume_load']:.0f} | {r['resume']:.0f} | {worst / r['share']:.2f} | "
                f"{r['resume_load'] / r['step']:.2f} | {r['resume'] / r['step2']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.phases:
        with tempfile.TemporaryDirectory() as root:
            full_dir, empty_dir = os.path.join(root, "full"), os.path.join(root, "empty")
            make_config = MODEL_CONFIGS[args.model]
            full_mb = save_model(full_dir, make_config(args.layers, args.hidden, args.vocab))
            save_model(empty_dir, make_config(4, 64, EMPTY_VOCAB))
            vocab = min(args.vocab, EMPTY_VOCAB)  # tokens both models know
            runs = {}
            for layout in args.layouts:  # the empty model and the model in turn (A, B per layout)
                empty = measure_phases(empty_dir, layout, args.seq, vocab)
                runs[layout] = above_empty(measure_phases(full_dir, layout, args.seq, vocab), empty)
                print(f"measured {layout}", flush=True)
        print(phases_report(full_mb, runs))
        return
    layouts = [1, *args.pp]
    with tempfile.TemporaryDirectory() as root:
        full_dir, empty_dir = os.path.join(root, "full"), os.path.join(root, "empty")
        make_config = MODEL_CONFIGS[args.model]
        full_mb = save_model(full_dir, make_config(args.layers, args.hidden, args.vocab))
        save_model(empty_dir, make_config(max(args.pp), 64, EMPTY_VOCAB))
        print(f"saved {full_mb:.0f} MB to {full_dir}", flush=True)
        vocab = min(args.vocab, EMPTY_VOCAB)  # tokens both models know
        baselines = {pp: measure(empty_dir, pp, args.seq, "layers", vocab) for pp in layouts}
        runs = {}
        for pp in layouts:
            runs[pp] = measure(full_dir, pp, args.seq, args.balance, vocab, resume=args.resume)
            print(f"measured {'one process' if pp == 1 else f'pp={pp}'}", flush=True)
        if args.peft == "lora":
            lora_bases = {pp: measure(empty_dir, pp, args.seq, "layers", vocab, "lora") for pp in layouts}
            lora_runs = {}
            for pp in layouts:
                lora_runs[pp] = measure(full_dir, pp, args.seq, args.balance, vocab, "lora")
                print(f"measured LoRA {'one process' if pp == 1 else f'pp={pp}'}", flush=True)
    print(report(full_mb, runs, baselines))
    if args.peft == "lora":
        print()
        print(peft_report(runs, lora_runs, baselines, lora_bases))


if __name__ == "__main__":
    main()
