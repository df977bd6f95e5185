"""evaluate(), predict() and evaluation during training under pipelining equal Trainer's, for every schedule."""

import math

import numpy as np
import pytest
import torch
from transformers import EvalPrediction, Trainer, TrainingArguments

from helpers.distributed import run_distributed
from hf_pp import PipelineTrainer, PipelineTrainingArguments
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama

# 10 eval samples in batches of 4: the last batch is short (Trainer's remainder handling).
COMMON = dict(
    max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=3e-3, logging_steps=1,
    eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, report_to="none", use_cpu=True,
    seed=0, disable_tqdm=True,
)
# The loss falls, so "best = highest eval loss" picks checkpoint-2, not the last one: the reload is visible.
BEST = dict(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
ON_START = dict(eval_on_start=True, max_steps=2)
# Trainer smooths the evaluation loss too; a large factor, so that it shows on a fresh model's near-uniform logits.
SMOOTH = dict(label_smoothing_factor=0.9)


def next_token_argmax(logits, labels):
    return logits.argmax(dim=-1)


def accuracy(prediction):
    predicted, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]
    mask = labels != -100
    return {"accuracy": float((predicted[mask] == labels[mask]).mean())}


def _kwargs():
    return dict(train_dataset=CountingDataset(size=16), eval_dataset=CountingDataset(size=10, seed=1),
                data_collator=pad_collator, compute_metrics=accuracy, preprocess_logits_for_metrics=next_token_argmax)


def _summary(trainer, train):
    before = trainer.evaluate()
    if train:
        trainer.train()
    evals = [{k: v for k, v in h.items() if k in ("step", "eval_loss", "eval_accuracy")}
             for h in trainer.state.log_history if "eval_loss" in h]
    predicted = trainer.predict(CountingDataset(size=6, seed=2))
    return before, evals, predicted.predictions, predicted.label_ids, predicted.metrics["test_loss"]


def _best(trainer):
    return (trainer.state.best_model_checkpoint or "none").rsplit("/", 1)[-1]


def _pipeline_worker(rank, world_size, output_dir, runs):
    out = {}
    for schedule, train, extra in runs:
        args = PipelineTrainingArguments(output_dir=f"{output_dir}/{schedule}", pp_size=2, pp_schedule=schedule,
                                         **{**COMMON, **extra})
        trainer = PipelineTrainer(model=tiny_llama(), args=args, **_kwargs())
        out[schedule] = _summary(trainer, train) + (_best(trainer),)
        snapshot = {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()}
        # prediction_loss_only: no logits travel, compute_metrics is skipped, as in Trainer.
        only_loss = trainer.evaluate(CountingDataset(size=4, seed=3))
        trainer.args.prediction_loss_only = True
        out[schedule] += (trainer.evaluate(CountingDataset(size=4, seed=3)), only_loss)
        trainer.args.prediction_loss_only = False
        after = dict(trainer.model.original_named_parameters())
        out[(schedule, "after_evaluate")] = (
            sorted(after) == sorted(snapshot) and all(torch.equal(after[n], v) for n, v in snapshot.items()),
            [n for n, p in after.items() if p.grad is not None], len(snapshot),
        )
    return out


@pytest.mark.slow
def test_evaluate_and_predict_match_trainer(tmp_path):
    references = {}
    for name, extra, train in (("best", BEST, True), ("on_start", ON_START, True), ("smooth", SMOOTH, False)):
        trainer = Trainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path / name), **{**COMMON, **extra}),
                          **_kwargs())
        references[name] = _summary(trainer, train) + (_best(trainer),)
    assert references["best"][5] == "checkpoint-2" and [e["step"] for e in references["on_start"][1]] == [0, 2]
    assert references["smooth"][0]["eval_loss"] != pytest.approx(references["best"][0]["eval_loss"], rel=2e-4)
    runs = [("1f1b", True, BEST), ("zbv_zero_bubble", True, BEST), ("interleaved_1f1b", True, ON_START),
            ("dual_pipe_v", False, {}), ("gpipe", False, SMOOTH)]
    per_rank = run_distributed(_pipeline_worker, 2, str(tmp_path / "pp"), runs, timeout_s=600)
    for schedule, train, extra in runs:
        reference = references["on_start" if extra is ON_START else "smooth" if extra is SMOOTH else "best"]
        for rank, out in enumerate(per_rank):
            label = f"{schedule} rank {rank}"
            before, evals, predictions, label_ids, test_loss = out[schedule][:5]
            assert before["eval_loss"] == pytest.approx(reference[0]["eval_loss"], rel=1e-5), label
            assert before["eval_accuracy"] == pytest.approx(reference[0]["eval_accuracy"], rel=1e-5), label
            np.testing.assert_array_equal(label_ids, reference[3], err_msg=label)
            if train:
                assert [e["step"] for e in evals] == [e["step"] for e in reference[1]], label
                for got, ref in zip(evals, reference[1]):
                    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5), (label, got, ref)
                    assert got["eval_accuracy"] == pytest.approx(ref["eval_accuracy"], rel=1e-5), (label, got, ref)
                assert out[schedule][5] == reference[5], f"{label}: best checkpoint"
                np.testing.assert_array_equal(predictions, reference[2], err_msg=label)  # best model reloaded
                assert test_loss == pytest.approx(reference[4], rel=1e-5), label
            loss_only, with_metrics = out[schedule][-2:]
            assert "eval_accuracy" not in loss_only and "eval_accuracy" in with_metrics, label
            assert loss_only["eval_loss"] == pytest.approx(with_metrics["eval_loss"], rel=1e-6), label
            unchanged, with_grad, num_params = out[(schedule, "after_evaluate")]
            assert num_params > 0 and unchanged, f"{label}: evaluate() changed parameters"
            assert with_grad == [], f"{label}: evaluate() left gradients on {with_grad}"


CALLS = {"preprocess": 0}


def counting_argmax(logits, labels):
    CALLS["preprocess"] += 1
    return logits.argmax(dim=-1)


def _preprocess_worker(rank, world_size, output_dir):
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, **COMMON)
    trainer = PipelineTrainer(model=tiny_llama(), args=args, **{**_kwargs(), "preprocess_logits_for_metrics": counting_argmax})
    metrics = trainer.evaluate()
    return CALLS["preprocess"], metrics["eval_accuracy"], trainer.preprocess_logits_for_metrics is counting_argmax


@pytest.mark.slow
def test_preprocess_logits_for_metrics_runs_on_the_last_stage_before_the_logits_cross(tmp_path):
    """Only the argmax crosses to the other pipeline rank, never [batch, seq, vocab] logits; metrics as Trainer's."""
    reference = Trainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path / "ref"), **COMMON),
                        **_kwargs()).evaluate()
    (calls0, accuracy0, restored0), (calls1, accuracy1, restored1) = run_distributed(
        _preprocess_worker, 2, str(tmp_path / "pp"))
    assert calls0 == 0 and calls1 > 0, (calls0, calls1)  # rank 1 holds the last stage
    assert accuracy0 == accuracy1 == pytest.approx(reference["eval_accuracy"])
    assert restored0 and restored1


class ReceivedTensors:
    """Records the shape and dtype of every tensor this rank receives through ``torch.distributed`` (collectives,
    object broadcasts and point-to-point receives, pipelining's included) while the block runs."""

    def __init__(self):
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        self.received, self._modules, self._real = [], (dist, c10d), {}
        rank = dist.get_rank

        def src_of(kwargs, args, position):
            src = kwargs.get("src", args[position] if len(args) > position else None)
            if src is None and kwargs.get("group_src") is not None:
                src = dist.get_global_rank(kwargs.get("group"), kwargs["group_src"])
            return src

        self._wrappers = {
            "broadcast": lambda t, *a, **k: [] if src_of(k, a, 0) == rank() else [t],
            "all_reduce": lambda t, *a, **k: [t],
            "all_gather": lambda out, t, *a, **k: [o for o in out if o is not t],
            "all_gather_into_tensor": lambda out, t, *a, **k: [out],
            "recv": lambda t, *a, **k: [t],
            "irecv": lambda t, *a, **k: [t],
        }

    def __enter__(self):
        for name, received in self._wrappers.items():
            real = self._real[name] = getattr(self._modules[1], name)

            def wrapped(*args, _real=real, _received=received, **kwargs):
                self.received += [(tuple(t.shape), t.dtype) for t in _received(*args, **kwargs)]
                return _real(*args, **kwargs)

            for module in self._modules:
                setattr(module, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, real in self._real.items():
            for module in self._modules:
                setattr(module, name, real)

    def bytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.received)


METRIC_CALLS = []


def accuracy_of_logits(prediction):
    """compute_metrics on the full logits (no preprocess_logits_for_metrics): records where it runs and on what."""
    METRIC_CALLS.append(prediction.predictions.shape)
    return accuracy(EvalPrediction(prediction.predictions.argmax(-1), prediction.label_ids))


def _received_worker(rank, world_size, output_dir):
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, **COMMON)
    trainer = PipelineTrainer(model=tiny_llama(), args=args, eval_dataset=CountingDataset(size=10, seed=1),
                              data_collator=pad_collator, compute_metrics=accuracy_of_logits)
    trainer.args.prediction_loss_only = True
    trainer.evaluate()  # builds the schedules of these shapes (their shape exchange is not what is counted)
    with ReceivedTensors() as loss_only:
        trainer.evaluate()
    trainer.args.prediction_loss_only = False
    with ReceivedTensors() as with_metrics:
        metrics = trainer.evaluate()
    calls = list(METRIC_CALLS)
    with ReceivedTensors() as predicting:
        predicted = trainer.predict(CountingDataset(size=10, seed=1))
    return (metrics, calls, loss_only.received, loss_only.bytes(), with_metrics.received, with_metrics.bytes(),
            predicting.received, predicted.predictions.shape, predicted.metrics)


@pytest.mark.slow
def test_evaluate_sends_no_logits_to_other_pipeline_ranks_and_metrics_match_trainer(tmp_path):
    """evaluate(): compute_metrics runs on the last stage, the other rank receives its dict and never a logits tensor
    (counted: every tensor it receives); predict() still gives every rank the predictions, as Trainer."""
    kwargs = dict(eval_dataset=CountingDataset(size=10, seed=1), data_collator=pad_collator,
                  compute_metrics=accuracy_of_logits)
    reference = Trainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path / "ref"), **COMMON), **kwargs)
    expected, expected_predict = reference.evaluate(), reference.predict(CountingDataset(size=10, seed=1))
    vocab = tiny_llama().config.vocab_size
    first, last = run_distributed(_received_worker, 2, str(tmp_path / "pp"))  # rank 1 holds the last stage
    for rank, (metrics, *_, predicted_shape, predict_metrics) in enumerate((first, last)):
        assert metrics["eval_accuracy"] == pytest.approx(expected["eval_accuracy"], rel=1e-6), rank
        assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5), rank
        assert predicted_shape == expected_predict.predictions.shape, rank
        assert predict_metrics["test_accuracy"] == pytest.approx(expected_predict.metrics["test_accuracy"]), rank
    # compute_metrics saw the full logits on the last stage only.
    assert first[1] == [] and last[1] == [expected_predict.predictions.shape], (first[1], last[1])
    _, _, loss_only, loss_only_bytes, with_metrics, with_metrics_bytes, predicting = first[:7]
    assert with_metrics and loss_only, "the counter sees the loss and the metrics arrive"
    assert not [s for s, _ in with_metrics if s[-1:] == (vocab,)], f"rank 0 received logits: {with_metrics}"
    # What evaluate() with metrics adds on rank 0 is the pickled metrics dict: less than the smallest batch's logits
    # (2 samples of at least 5 tokens).
    assert with_metrics_bytes - loss_only_bytes < 2 * 5 * vocab * 4, (with_metrics_bytes, loss_only_bytes)
    assert [s for s, _ in predicting if s[-1:] == (vocab,)], "predict(): the logits reach rank 0 (the counter sees them)"
