"""The examples run as documented (torchrun on CPU) and reach their claims."""

import os
import re
import subprocess
import sys

import pytest

from helpers.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(script: str, nproc: int, *args: str, timeout: float = 300) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", os.path.join(ROOT, script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("nproc,schedule", [(2, "1f1b"), (4, "interleaved_1f1b")])
def test_custom_model_example_learns_and_matches_unsplit(nproc, schedule):
    out = torchrun("examples/custom_model_pipeline.py", nproc, "--schedule", schedule, "--steps", "10")
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) >= 2 and losses[-1] < 0.5 * losses[0], out
    diff = float(re.search(r"after 10 steps: (\S+)", out).group(1))
    assert diff < 1e-4, out


@pytest.mark.slow
def test_train_then_lora_examples_end_to_end(tmp_path):
    """The demo's two steps, shortened: full fine-tune + save, then LoRA on it + reload + generate."""
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    torchrun("examples/train_pp.py", 2, "--output_dir", str(base), "--max_steps", "12", "--eval_steps", "6",
             "--disable_tqdm", "true")
    model = AutoModelForCausalLM.from_pretrained(base / "final")  # one process, the whole model
    assert model.config.num_hidden_layers == 8
    out = torchrun("examples/finetune_lora.py", 2, "--base_model", str(base / "final"), "--output_dir",
                   str(tmp_path / "lora"), "--max_steps", "15", "--logging_steps", "5", "--disable_tqdm", "true")
    first, last = map(float, re.search(r"loss (\d+\.\d+) -> (\d+\.\d+)", out).groups())
    assert last < 0.85 * first, out  # measured 3.059 -> 2.276 (0.74 x), the same in repeated runs
    assert out.count("' -> '") == 3, out  # three generations from the reloaded adapter
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "schedule.png", "loss.png"):
        assert (tmp_path / "lora" / name).is_file(), name


@pytest.mark.slow
def test_classification_example_learns_and_its_saved_model_classifies_in_one_process(tmp_path):
    out = torchrun("examples/classify_pp.py", 2, "--output_dir", str(tmp_path), "--disable_tqdm", "true")
    accuracy = float(re.search(r"eval accuracy (\d\.\d+)", out).group(1))
    assert accuracy > 0.9, out  # measured 0.990 (3 classes: chance is 0.33)
    for line in ("'6 plus 3 is 9.' -> plus", "'4 times 5 is 20.' -> times", "'9 minus 2 is 7.' -> minus"):
        assert line in out, out  # the reloaded directory classifies new lines
    assert (tmp_path / "final" / "model.safetensors.index.json").is_file()


@pytest.mark.slow
def test_train_example_under_accelerate_launch(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), os.path.join(ROOT, "examples/train_pp.py"), "--output_dir", str(tmp_path),
           "--max_steps", "4", "--eval_steps", "2", "--disable_tqdm", "true"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "steps 4; model saved" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_tensor_parallel_hook_example_matches_unsplit():
    out = torchrun("examples/tensor_parallel_pipeline.py", 4)
    pairs = re.findall(r"loss (\d+\.\d+) \(unsplit (\d+\.\d+)\)", out)
    assert len(pairs) == 3 and all(abs(float(a) - float(b)) < 1e-5 for a, b in pairs), out
    diffs = [float(x) for x in re.findall(r"weight difference: (\d\.\d+e[-+]\d+)", out)]
    assert len(diffs) == 4 and max(diffs) < 1e-5, out


@pytest.mark.slow
def test_tensor_parallel_example_refuses_a_world_size_other_than_pp_x_tp():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", os.path.join(ROOT, "examples/tensor_parallel_pipeline.py")]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "pp=2 x tp=2 = 4 ranks, but the world size is 2; launch it with torchrun --nproc-per-node 4" in proc.stderr


@pytest.mark.slow
def test_mixed_parallel_example_runs_pp2_x_dp2_fsdp(tmp_path):
    out = torchrun("examples/mixed_parallel.py", 4, "--output_dir", str(tmp_path), "--max_steps", "4",
                   "--disable_tqdm", "true")
    assert out.count("(fsdp)") == 4 and "total batch 16" in out, out
    assert (tmp_path / "final" / "model.safetensors.index.json").is_file()


@pytest.mark.slow
def test_sft_trl_example_learns_and_its_saved_model_generates(tmp_path):
    pytest.importorskip("trl")
    out = torchrun("examples/sft_trl.py", 2, "--output_dir", str(tmp_path), "--max_steps", "100",
                   "--disable_tqdm", "true")
    first, last, acc_first, acc_last = map(float, re.search(
        r"loss (\d+\.\d+) -> (\d+\.\d+)  mean_token_accuracy (\d\.\d+) -> (\d\.\d+)", out).groups())
    assert last < 0.5 * first and acc_last > acc_first + 0.1, out  # measured 1.784 -> 0.500, 0.567 -> 0.793 (150 steps)
    assert out.count("' -> '") == 3, out  # three completions from the reloaded directory
    assert (tmp_path / "final" / "config.json").is_file()
