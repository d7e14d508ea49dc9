"""Glue between qfit and transformers' Trainer, shared by the single-GPU session and every rank of a
multi-GPU run: the dataset and padding collator, the stop flag that SIGINT/SIGTERM set, the progress and
stop callbacks, the Trainer as `qfit run` configures it, the emergency checkpoint after an OOM, and the
settings read back from the model and trainer after training.

Module level is light; transformers, peft, bitsandbytes and torch are imported inside the functions (the
callback classes are defined on first use), so importing this module does not import transformers.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from functools import lru_cache
from pathlib import Path

from planner import data as qdata
from planner.report import gib_str
from planner.specs import TrainSettings
from planner.train.measure import peak_snapshot
from planner.train.options import LOG_POINTS, MAX_GRAD_NORM, SAVE_TOTAL_LIMIT
from planner.train.output import last_checkpoint


class ExampleDataset:
    """Tokenized examples for the Trainer (map-style: __len__ and __getitem__)."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "labels": ex.labels}


class PadCollator:
    """Pads each micro-batch to its longest row, or with pad_to every row to pad_to tokens (right padding;
    labels -100 and attention mask 0 on padding), and counts the padded tokens (what the device computed)
    and the longest micro-batch it produced."""

    def __init__(self, pad_id: int, pad_to: int | None = None):
        self.pad_id = pad_id
        self.pad_to = pad_to  # --padding max-length: --seq-len (rows are already truncated to it)
        self.tokens = 0
        self.padded_tokens = 0
        self.longest = 0
        self.batches: deque = deque()  # (real, computed) tokens of each micro-batch made, oldest first

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        n = max(max(len(b["input_ids"]) for b in batch), self.pad_to or 0)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), qdata.IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.tensor(b["labels"], dtype=torch.long)
            mask[i, :k] = 1
        self.tokens += int(mask.sum())
        self.padded_tokens += len(batch) * n
        self.batches.append((int(mask.sum()), len(batch) * n))
        self.longest = max(self.longest, n)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class StopFlag:
    """SIGINT/SIGTERM set this; training stops after the current optimizer step, with a checkpoint.
    A second SIGINT raises KeyboardInterrupt at once (the user insists)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


def dataset_and_collator(examples, pad_id: int, config: dict):
    """The Trainer's dataset and collator for a run's config: packed rows (planner.packing: whole examples in rows
    of seq_len tokens, no attention mask) or one example per row, padded to the longest of its micro-batch or, with
    --padding max-length, to seq_len. Both collators count real and computed tokens."""
    if config.get("packing"):
        from planner.packing import PackedCollator, PackedDataset

        rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
        return PackedDataset(rows, config["seq_len"]), PackedCollator(pad_id, config["seq_len"])
    return ExampleDataset(examples), PadCollator(pad_id, pad_to=config["seq_len"] if config.get("padding") == "max-length" else None)


# --scheduler -> transformers' lr_scheduler_type (constant keeps the warmup: plain "constant" would ignore it)
SCHEDULER_TYPES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def build_trainer(model, tokenizer, dataset, collator, out: Path, train: TrainSettings, config: dict, cbs: list,
                  eval_data: tuple | None = None):
    """The single-GPU Trainer of `qfit run`: the recipe's schedule (--scheduler, cosine by default; warmup,
    max_grad_norm 0.3), the saved run's steps and checkpoint interval, qfit's callbacks `cbs` and partial
    checkpointing if planned. eval_data: (dataset, collator) of the validation split (dataset_and_collator, so
    packed like training), evaluated every config["eval"]["steps"] steps at the training micro-batch under no_grad,
    loss only (no logits kept)."""
    from transformers import PrinterCallback, Trainer

    from planner.train import stack

    total = config["max_steps"]
    report_to = config.get("report_to", "none")
    extra = {}
    if eval_data is not None:
        extra = {"eval_strategy": "steps", "eval_steps": config["eval"]["steps"], "prediction_loss_only": True,
                 "per_device_eval_batch_size": train.batch_size}
    args = stack.training_arguments(
        str(out), train, max_steps=total, learning_rate=config["learning_rate"],
        lr_scheduler_type=SCHEDULER_TYPES[config.get("scheduler", "cosine")],
        warmup_steps=config["warmup"], max_grad_norm=MAX_GRAD_NORM, save_strategy="steps",
        save_steps=config["save_steps"], save_total_limit=SAVE_TOTAL_LIMIT, logging_strategy="steps",
        logging_steps=max(1, total // LOG_POINTS), report_to=[] if report_to == "none" else [report_to],
        seed=config["seed"], disable_tqdm=True, include_num_input_tokens_seen="non_padding", **extra)
    if args.n_gpu > 1:
        args._n_gpu = 1  # one GPU: otherwise the Trainer multiplies the micro-batch by the GPU count

    class QfitTrainer(Trainer):
        """Evaluation batches come from their own collator, so the training collator counts training tokens only."""

        eval_collator = None

        def get_eval_dataloader(self, eval_dataset=None):
            if self.eval_collator is None:
                return super().get_eval_dataloader(eval_dataset)
            train_collator, self.data_collator = self.data_collator, self.eval_collator
            try:
                return super().get_eval_dataloader(eval_dataset)
            finally:
                self.data_collator = train_collator

    trainer = QfitTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          eval_dataset=eval_data[0] if eval_data else None,
                          processing_class=tokenizer, callbacks=[*cbs, *stack.checkpoint_callbacks(train)])
    trainer.eval_collator = eval_data[1] if eval_data else None
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; qfit's own bar shows the loss
    return trainer


def emergency_checkpoint(trainer, out: Path) -> str | None:
    """After an OOM: the optimizer state is that of the last finished step (the failed step's partial
    gradients are dropped), so saving now loses nothing. Falls back to the last periodic checkpoint."""
    step = trainer.state.global_step
    path = out / f"checkpoint-{step}"
    if step > 0 and not (path / "trainer_state.json").is_file():
        try:
            trainer._save_checkpoint(trainer.model, trial=None)  # the Trainer's own save: resumable as usual
        except Exception:  # still short of memory, disk full: use the last periodic checkpoint
            pass
    ckpt = last_checkpoint(out)
    return str(ckpt) if ckpt is not None else None


@lru_cache(maxsize=1)
def callback_classes() -> tuple[type, type]:
    """(StopCallback, ProgressCallback): TrainerCallback subclasses, defined on first use so that
    importing this module does not import transformers."""
    from transformers import TrainerCallback

    class StopCallback(TrainerCallback):
        """Turns a received SIGINT/SIGTERM into 'save a checkpoint after this step, then stop'."""

        def __init__(self, stop: StopFlag):
            self.stop = stop

        def on_step_end(self, args, state, control, **kwargs):
            if self.stop.signum is not None and state.global_step < state.max_steps:
                control.should_save = True  # the Trainer saves checkpoint-<step> right after this
                control.should_training_stop = True
            return control

    class ProgressCallback(TrainerCallback):
        """A tqdm bar with loss, tokens/s and GPU memory; also times the steps for the report."""

        def __init__(self, collator: PadCollator, cuda: bool, enabled: bool = True, echo=None, watch: bool = False):
            self.collator, self.cuda, self.enabled = collator, cuda, enabled
            self.echo = echo or (lambda line: None)
            self.watch = watch  # one GPU: memory per logging interval (peaks reset at each) and the leak check
            self.evals: list[dict] = []  # {"step", "eval_loss", "train_loss"} per evaluation
            self.memory: list[dict] = []  # {"step", "peak_allocated_bytes", "allocated_bytes"} per logging interval
            self.peak_allocated = self.peak_reserved = 0  # the run's peaks across the per-interval resets
            self.warnings: list[dict] = []  # {"kind": "divergence" | "leak", "step", "message"}
            self.bar = None
            self.loss = None
            self.train_seconds = 0.0
            self.train_tokens = 0
            self.train_padded_tokens = 0
            self.steps_run = 0
            self._t = 0.0
            self._tok = 0
            self._pad = 0
            self._rate = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            if self.enabled and self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="qfit run", unit="step",
                                dynamic_ncols=True, mininterval=0.5)
            elif self.bar is not None:  # a restart after an OOM back-off
                self.bar.n = state.global_step
                self.bar.refresh()
            self._mark(state)

        def _mark(self, state):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            dt = time.perf_counter() - self._t
            # the micro-batches this step trained on, oldest first: the data loader may have made the next one already
            tok = pad = 0
            for _ in range(min(args.gradient_accumulation_steps, len(self.collator.batches))):
                real, computed = self.collator.batches.popleft()
                tok, pad = tok + real, pad + computed
            self.train_seconds += dt
            self.train_tokens += tok
            self.train_padded_tokens += pad
            self.steps_run += 1
            self._rate = tok / dt if dt > 0 else 0.0
            if (args.eval_strategy != "no" and state.global_step >= state.max_steps and args.eval_steps
                    and state.global_step % args.eval_steps and not any(e["step"] == state.global_step for e in self.evals)):
                control.should_evaluate = True  # the final validation loss, when the last step is off the interval
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
                self._postfix()
            self._mark(state)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])
                if self.watch:
                    self._watch_memory(state.global_step)
                if self.bar is not None:
                    self._postfix()

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            from planner.train.watch import divergence_step

            if metrics and "eval_loss" in metrics:
                self.evals.append({"step": state.global_step, "eval_loss": float(metrics["eval_loss"]),
                                   "train_loss": self.loss})
                step = divergence_step(self.evals)
                if step is not None and not any(w["kind"] == "divergence" for w in self.warnings):
                    best = min(self.evals, key=lambda e: e["eval_loss"])
                    self._warn("divergence", step, f"warning: validation loss rising since step {step} while training "
                               f"loss falls (best {best['eval_loss']:.3f} at step {best['step']}, now "
                               f"{self.evals[-1]['eval_loss']:.3f}): the adapter may be overfitting; the checkpoint "
                               f"near step {best['step']} may be the better one")
                if self.bar is not None:
                    self._postfix()
            self._mark(state)  # evaluation is not training time

        def _watch_memory(self, step: int):
            """One logging interval: its peak (then reset) and what stays allocated after the step; the leak check."""
            from planner.train.watch import leak_step

            if not self.cuda:  # nothing to measure: the steps are recorded with nulls
                self.memory.append({"step": step, "peak_allocated_bytes": None, "allocated_bytes": None})
                return
            import torch

            snap = peak_snapshot(sync=False)
            self.peak_allocated = max(self.peak_allocated, snap["peak_allocated_bytes"])
            self.peak_reserved = max(self.peak_reserved, snap["peak_reserved_bytes"])
            self.memory.append({"step": step, "peak_allocated_bytes": snap["peak_allocated_bytes"],
                                "allocated_bytes": int(torch.cuda.memory_allocated())})
            torch.cuda.reset_peak_memory_stats()
            start = leak_step(self.memory)
            if start is not None and not any(w["kind"] == "leak" for w in self.warnings):
                self._warn("leak", start, f"warning: allocated memory after each step has grown since step {start} "
                           f"({gib_str(self.memory[-1]['allocated_bytes'])} GiB now): something keeps tensors "
                           "alive (a leak); see memory.per_interval in run_report.json")

        def _warn(self, kind: str, step: int, message: str):
            self.warnings.append({"kind": kind, "step": step, "message": message})
            self.echo(message)

        def on_save(self, args, state, control, **kwargs):
            self._mark(state)  # saving is not training time

        def _postfix(self):
            parts = {"loss": f"{self.loss:.3f}" if self.loss is not None else "-", "tok/s": f"{self._rate:,.0f}"}
            if self.evals:
                parts["val"] = f"{self.evals[-1]['eval_loss']:.3f}"
            if self.cuda:
                import torch

                peak = peak_snapshot(sync=False)["peak_allocated_bytes"]
                parts["mem GiB"] = f"{gib_str(torch.cuda.memory_allocated())}/{gib_str(peak)}"
            self.bar.set_postfix(parts, refresh=False)

        def close(self):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return StopCallback, ProgressCallback


def settings_in_effect(trainer, model, seq_len: int) -> dict:
    """The settings as the model and trainer hold them after training (not as planned)."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    from planner.train.stack import decoder_layers

    args = trainer.args
    base = model.get_base_model()
    ckpt = base.is_activation_checkpointing if hasattr(type(base), "is_activation_checkpointing") \
        else base.is_gradient_checkpointing
    q4 = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    w = q4[0].weight if q4 else None
    qs = getattr(w, "quant_state", None)
    lcfg = model.peft_config[model.active_adapter]
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    dtype_names = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}
    trainable, total = model.get_nb_trainable_parameters()
    return {
        "batch_size": args.per_device_train_batch_size,
        "grad_accum": args.gradient_accumulation_steps,
        "effective_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps,
        "seq_len": seq_len,
        "gradient_checkpointing": bool(ckpt),
        # partial checkpointing: decoder layers whose flag is off while checkpointing is on
        "uncheckpointed_layers": sum(not layer.gradient_checkpointing for layer in decoder_layers(base)) if ckpt else 0,
        "optim": str(getattr(args.optim, "value", args.optim)),
        "optimizer_class": type(opt).__name__ if opt is not None else "",
        "compute_dtype": dtype_names.get(str(q4[0].compute_dtype), str(q4[0].compute_dtype)) if q4 else "",
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "quant_type": getattr(w, "quant_type", ""),
        "double_quant": bool(getattr(qs, "nested", False)),
        "quantized_linears": len(q4),
        "rank": lcfg.r, "alpha": lcfg.lora_alpha, "lora_dropout": lcfg.lora_dropout,
        "targets": sorted(lcfg.target_modules) if not isinstance(lcfg.target_modules, str) else [lcfg.target_modules],
        "lora_layers": sum(1 for m in model.modules() if isinstance(m, LoraLayer)),
        "trainable_params": int(trainable), "total_params": int(total),
        "learning_rate": args.learning_rate,
        "lr_scheduler": type(trainer.lr_scheduler).__name__ + f" ({getattr(args.lr_scheduler_type, 'value', '')})",
        "warmup_steps": args.get_warmup_steps(args.max_steps),
        "max_grad_norm": args.max_grad_norm,
        "device": str(args.device),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") if str(args.device).startswith("cuda") else "",
    }
