"""One single-GPU (or CPU) training run of `qfit run`, shaped like torchtune's recipes
(recipes/lora_finetune_single_device.py): one object holds the run's state, and

  setup()    loads the model through the real QLoRA path (planner.train.stack: NF4 + double quant,
             k-bit prep), wraps it with LoRA, caps the allocator under GPU emulation and, on CUDA, runs the
             fit probe: one forward + backward at the planned micro-batch and the full sequence length;
  train()    runs transformers' Trainer; an out-of-memory error applies the one back-off policy
             (planner.train.oom.next_settings) and resumes from a checkpoint of the last finished step;
  finish()   measures the peak (planner.train.measure), saves the adapter and tokenizer, writes
             run_report.json and appends the calibration row (planner.train.run_report), and prints;
  cleanup()  closes the progress bar, restores the signal handlers, the log level and the allocator cap.

`run()` does the four in order. Module level is light; torch, transformers and peft are imported inside.
"""

from __future__ import annotations

import gc
import time
import warnings
from pathlib import Path

from planner.memory import resolve_targets
from planner.report import gib_str
from planner.specs import Plan, TrainSettings
from planner.train import run_report
from planner.train.device import Device, cap_for_emulation
from planner.train.measure import nvml_used, peak_snapshot
from planner.train.oom import NoSmallerSettings, explain, is_cuda_oom, next_settings
from planner.train.options import RunError, RunOptions, RunResult, one_line
from planner.train.output import RUN_CONFIG, RUN_REPORT, check_checkpoint, last_checkpoint, write_json
from planner.train.source import ModelSource
from planner.train.trainer_glue import (
    StopFlag,
    build_trainer,
    callback_classes,
    dataset_and_collator,
    emergency_checkpoint,
    settings_in_effect,
)


def free_cuda() -> None:
    """Collect garbage and hand the allocator's free blocks back (after an OOM, before a retry)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def back_off(train: TrainSettings, step: int, phase: str, message: str, checkpoint: str | None,
             echo) -> tuple[TrainSettings, dict]:
    """The OOM policy applied to one GPU: the next settings and the event record, the event printed;
    a RunError saying what to try when nothing smaller is left. step: finished steps (0-based)."""
    try:
        new, record = next_settings(train, {"phase": phase, "step": step + 1, "message": message,
                                            "resumed_from": checkpoint})
    except NoSmallerSettings:
        raise RunError(f"out of memory at micro-batch 1 x {train.seq_len} tokens ({phase}, step {step + 1}): "
                       "try --gradient-checkpointing, a shorter --seq-len, a lower --rank or a smaller model") from None
    echo(explain(record))
    return new, record


def fit_probe(model, train: TrainSettings, vocab_size: int, echo,
              device: str = "cuda") -> tuple[TrainSettings, list[dict], dict]:
    """One forward + backward at the micro-batch of `train` and the full sequence length (the worst
    micro-batch the data can produce), before any step: an OOM here backs off at once and probes again.
    -> (the settings that ran, the OOM event records, the probe's measured peaks)."""
    import torch

    from planner.train.stack import TORCH_DTYPES, uncheckpoint_last_layers

    cuda = device == "cuda"
    events: list[dict] = []
    model.train()  # from_pretrained returns eval mode, where checkpointing and dropout are off
    while True:
        t = train
        if t.gradient_checkpointing:
            # transformers 5.x renamed gradient_checkpointing_enable -> activation_checkpointing_enable (5.17 has
            # only the old name, 5.24 both): the one this install has
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
            uncheckpoint_last_layers(model, t.uncheckpointed_layers)
        oom = None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            ids = torch.randint(3, vocab_size, (t.batch_size, t.seq_len), device=device)
            extra = {}
            if t.packing:  # several examples per row: transformers builds the block mask a packed step costs
                seg = max(2, t.seq_len // 4)
                extra["position_ids"] = (torch.arange(t.seq_len, device=device) % seg).expand(t.batch_size, -1)
            with torch.autocast(device, dtype=TORCH_DTYPES[t.compute_dtype]):
                loss = model(input_ids=ids, labels=ids, **extra).loss
            loss.backward()
            del loss, ids
        except Exception as exc:
            if not is_cuda_oom(exc):
                raise
            oom = one_line(exc)
        model.zero_grad(set_to_none=True)
        free_cuda()
        if oom is None:
            snap = peak_snapshot(sync=False) if cuda else {"peak_allocated_bytes": 0, "peak_reserved_bytes": 0}
            measured = {"probe_peak_allocated_bytes": snap["peak_allocated_bytes"],
                        "probe_peak_reserved_bytes": snap["peak_reserved_bytes"]}
            echo(f"fit probe: micro-batch {t.batch_size} x {t.seq_len} tokens ran"
                 + (f", peak {gib_str(snap['peak_allocated_bytes'])} GiB allocated" if cuda else ""))
            return train, events, measured
        train, record = back_off(t, step=0, phase="probe", message=oom, checkpoint=None, echo=echo)
        events.append(record)


# how each method's base is loaded, for the progress line and errors (planner.specs.METHODS)
LOADED_AS = {"qlora": "in 4-bit", "lora": "in 16-bit ({dtype}, no quantization)", "lora-8bit": "in 8-bit (LLM.int8)"}

class TrainingSession:
    """The state of one single-GPU run: what was planned and where, and what changes while it trains
    (the settings in effect after any OOM back-off, the OOM events, the measurements)."""

    def __init__(self, opts: RunOptions, out: Path, src: ModelSource, tokenizer, examples, plan: Plan, device: Device,
                 config: dict, data_info: dict, echo, callbacks: tuple = (), eval_examples=()):
        self.opts, self.out, self.src, self.tokenizer, self.examples = opts, out, src, tokenizer, examples
        self.plan, self.device, self.config, self.data_info = plan, device, config, data_info
        self.echo, self.callbacks = echo, callbacks
        self.eval_examples = list(eval_examples)  # the validation split; empty: no validation
        self.eval_data = None  # (dataset, collator) of the validation split, packed like training
        self.sample: dict | None = None  # --sample-prompt's completion
        self.cuda = device.kind == "cuda"
        self.train_settings: TrainSettings = plan.train  # in effect: changed by the OOM back-off
        self.oom_events: list[dict] = []
        self.measured: dict = {}
        self.notes: list[str] = []
        self.emulation: dict = {}  # QFIT_EMULATE_GPU: the card and the allocator budget
        self.model = self.dataset = self.collator = self.trainer = self.progress = None
        self.stop = StopFlag()
        self.checkpoint: Path | None = None  # the checkpoint --resume starts from
        self.resumed_from: str | None = None
        self._stop_installed = False
        self._verbosity: int | None = None

    def run(self) -> RunResult:
        try:
            self.setup()
            self.train()
            return self.finish()
        finally:
            self.cleanup()

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        import torch
        from peft import get_peft_model
        from transformers.utils import logging as hf_logging

        from planner.train import stack

        plan, src, echo = self.plan, self.src, self.echo
        self._verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # qfit prints its own progress; the Trainer's info lines are noise here
        t_load = time.perf_counter()
        if self.cuda:
            try:
                self.measured["nvml_baseline_bytes"] = nvml_used()[0]
            except Exception:  # NVML is a measurement extra: never fail a run for it
                self.measured["nvml_baseline_bytes"] = 0
            torch.cuda.reset_peak_memory_stats()
            self.emulation = cap_for_emulation(self.device, plan, echo)  # before the load: the load must fit too
        try:
            model = stack.load_base(src.ref, plan.train, device_map={"": 0} if self.cuda else None)
        except (OSError, ValueError) as exc:
            raise RunError(f"cannot load {src.ref} {LOADED_AS[plan.train.method]} ({one_line(exc, 160)})") from None
        if self.cuda:
            self.measured["load_peak_allocated_bytes"] = peak_snapshot(sync=False)["peak_allocated_bytes"]
            self.measured["after_load_allocated_bytes"] = torch.cuda.memory_allocated()
        names = resolve_targets(src.spec, plan.lora.targets)
        with warnings.catch_warnings():  # peft reads the deprecated is_gradient_checkpointing (transformers 5)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.model = get_peft_model(model, stack.lora_config(plan.lora, names))
        if self.cuda:
            self.measured["after_wrap_allocated_bytes"] = torch.cuda.memory_allocated()
        how = (f"in 4-bit (NF4{', double quant' if plan.train.double_quant else ''})" if plan.train.method == "qlora"
               else LOADED_AS[plan.train.method].replace("{dtype}", plan.train.compute_dtype))
        echo(f"loaded {src.spec.display_name} {how} "
             f"with LoRA on {', '.join(names)} in {time.perf_counter() - t_load:.1f} s")
        self.dataset, self.collator = dataset_and_collator(self.examples, self.tokenizer.pad_token_id, self.config)
        if self.eval_examples and self.config.get("eval"):  # same tokenization, packing and collator as training
            self.eval_data = dataset_and_collator(self.eval_examples, self.tokenizer.pad_token_id, self.config)
        self.checkpoint = last_checkpoint(self.out) if self.opts.resume else None
        if self.checkpoint is not None:
            check_checkpoint(self.checkpoint)
            echo(f"resuming from {self.checkpoint.name} (step {int(self.checkpoint.name.rsplit('-', 1)[-1])} of "
                 f"{self.config['max_steps']})")
        elif self.cuda:
            self.train_settings, events, measured = fit_probe(self.model, self.train_settings, src.spec.vocab_size, echo)
            self.oom_events += events
            self.measured.update(measured)

    # ------------------------------------------------------------------ train

    def train(self) -> None:
        """Train to the planned step (or a signal); on OOM: back off, checkpoint, resume, no step lost."""
        import torch

        out, config, echo, model = self.out, self.config, self.echo, self.model
        stop_cls, progress_cls = callback_classes()
        self._stop_installed = self.stop.install()
        self.progress = progress_cls(self.collator, self.cuda, self.opts.progress, echo=echo, watch=True)
        initial = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
        resume_from = str(self.checkpoint) if self.checkpoint is not None else None
        self.resumed_from = resume_from
        echo(f"training: {config['max_steps']} steps of {self.train_settings.effective_batch} rows; checkpoint every "
             f"{config['save_steps']} steps in {out}" + ("; Ctrl-C saves and stops" if self._stop_installed else ""))
        while True:
            cbs = [self.progress, *self.callbacks, stop_cls(self.stop)]  # the stop check last: it sees signals the others caused
            self.trainer = build_trainer(model, self.tokenizer, self.dataset, self.collator, out, self.train_settings,
                                         config, cbs, eval_data=self.eval_data)
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            oom = None
            try:
                self.trainer.train(resume_from_checkpoint=resume_from)
            except Exception as exc:
                if not is_cuda_oom(exc):
                    raise
                oom = one_line(exc)
            if oom is None:
                break
            # outside the except block: the traceback and the activations its frames held are released
            step = self.trainer.state.global_step
            model.zero_grad(set_to_none=True)
            free_cuda()
            resume_from = emergency_checkpoint(self.trainer, out)
            # the model keeps accelerate's autocast wrapper (marked prepared, it is not wrapped twice)
            self.trainer.accelerator.free_memory()
            self.trainer = None
            free_cuda()
            if resume_from is None:  # nothing saved yet: back to the weights the run started with
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if n in initial:
                            p.copy_(initial[n])
            self.train_settings, record = back_off(self.train_settings, step=step, phase="train", message=oom,
                                                   checkpoint=resume_from, echo=echo)
            self.oom_events.append(record)
            config["settings"].update(batch_size=self.train_settings.batch_size,
                                      grad_accum=self.train_settings.grad_accum)
            write_json(out / RUN_CONFIG, config)  # a later --resume continues with the reduced micro-batch
        self.progress.close()
        # the signal handlers stay until cleanup(): a signal now must not cut the final save short

    # ------------------------------------------------------------------ finish

    def finish(self) -> RunResult:
        """Measure, save the adapter, write run_report.json (and the calibration row), print the summary."""
        measured = dict(self.measured)
        if self.cuda:
            measured.update(peak_snapshot(nvml=True))
            measured.setdefault("nvml_used_bytes", 0)
            # the memory watch resets the peaks at every logging interval: the run's peak is the largest of them
            measured["peak_allocated_bytes"] = max(measured["peak_allocated_bytes"], self.progress.peak_allocated)
            measured["peak_reserved_bytes"] = max(measured["peak_reserved_bytes"], self.progress.peak_reserved)
        else:
            measured.update(peak_allocated_bytes=0, peak_reserved_bytes=0)
        effect = settings_in_effect(self.trainer, self.model, self.config["seq_len"])
        effect["padding"] = ("packed" if self.config.get("packing") else
                             "max-length" if self.collator.pad_to else "longest")  # as the collator padded
        report = run_report.single_report(self, measured, effect)
        out, echo = self.out, self.echo
        ckpt = report["checkpoint"]
        if report["status"] != "completed":
            write_json(out / RUN_REPORT, report)
            echo(f"stopped by {self.stop.name or 'the trainer'} at step {report['steps']['completed']} of "
                 f"{self.config['max_steps']}; checkpoint saved in {ckpt}")
            echo(f"continue with: qfit run --resume {out}")
            code = 128 + self.stop.signum if self.stop.signum else 1
            return RunResult("interrupted", out, report, exit_code=code, checkpoint=ckpt)

        self.model.save_pretrained(str(out))  # adapter_config.json + adapter_model.safetensors
        self.tokenizer.save_pretrained(str(out))
        report["adapter_dir"] = str(out)
        if self.opts.sample_prompt:
            from planner.train.sample import generate_sample

            report["sample"] = generate_sample(self.model, self.tokenizer, self.opts.sample_prompt, self.config["format"],
                                               self.train_settings.compute_dtype)
        calib = (run_report.append_calibration(report, self.plan, self.device, self.config, measured, self.progress,
                                               self.collator) if self.cuda else None)
        report["calibration_row"] = calib
        write_json(out / RUN_REPORT, report)
        for line in run_report.completed_lines(self, report):
            echo(line)
        return RunResult("completed", out, report, exit_code=0, checkpoint=ckpt)

    # ------------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self._stop_installed:
            self.stop.restore()
            self._stop_installed = False
        if self._verbosity is not None:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity(self._verbosity)
            self._verbosity = None
        if self.emulation:  # the cap is per process: lift it for whatever this process does next
            import torch

            torch.cuda.set_per_process_memory_fraction(1.0, 0)
