"""The distributed path on the CPU: 2 processes launched by accelerate (gloo), real 4-bit layers, DDP."""

import csv

import pytest

from planner.train import dist_sweep

pytestmark = pytest.mark.slow


def test_measure_sweep_two_cpu_processes(tmp_path):
    """planner.train.dist_sweep launches exactly what `qfit run --num-gpus` launches (accelerate + planner.launch);
    both ranks train every configuration, wrapped by the Trainer in DistributedDataParallel."""
    assert dist_sweep.main(["--cpu", "--out", str(tmp_path), "--groups", "tiny-ddp", "--group-timeout", "240"]) == 0
    configs = dist_sweep.groups(2)["tiny-ddp"][2]
    for rank in (0, 1):
        rows = list(csv.DictReader((tmp_path / "tiny-ddp" / f"rank{rank}.csv").open()))
        assert len(rows) == len(configs)
        assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
        assert {r["wrapper"] for r in rows} == {"DistributedDataParallel"}
        assert {r["world_size"] for r in rows} == {"2"} and {r["rank_index"] for r in rows} == {str(rank)}
        assert all(float(r["tokens_per_s"]) > 0 for r in rows)


def test_qfit_run_demo_on_two_cpu_processes(tmp_path):
    """`qfit run --demo --num-gpus 2` on the CPU: accelerate starts 2 gloo processes, the Trainer wraps the
    4-bit model in DDP over packed rows, rank 0 saves one standard PEFT adapter, and the report has both ranks."""
    import json

    from click.testing import CliRunner

    from planner.cli import cli

    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["run", "--demo", "--num-gpus", "2", "--max-steps", "6", "--output", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "run_report.json").read_text())
    assert report["status"] == "completed" and report["num_gpus"] == 2 and report["strategy"] == "ddp"
    assert report["steps"]["completed"] == 6
    # the demo's rows are shorter than the sequence: packed by default on several processes too, every rank's
    # micro-batches counted (non-padding tokens at most the computed ones, and most of them with packing)
    sp = report["speed"]
    assert sp["packing"] is True and report["planned"]["packing"] is True
    assert 0.8 * sp["train_padded_tokens"] <= sp["train_tokens"] <= sp["train_padded_tokens"]
    assert "packing:" in res.output
    s = report["planned"]
    assert report["global_batch"] == 2 * s["batch_size"] * s["grad_accum"]
    assert [r["rank"] for r in report["memory"]["measured_per_rank"]] == [0, 1]
    assert {r["wrapper"] for r in report["memory"]["measured_per_rank"]} == {"DistributedDataParallel"}
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    acc = json.loads((out / "accelerate_config.json").read_text())
    assert acc["num_processes"] == 2 and acc["use_cpu"] is True

    from peft import PeftModel

    from planner import demo
    from planner.train import stack

    base = stack.load_4bit(str(demo.prepare()), "bf16", True)
    model = PeftModel.from_pretrained(base, str(out))
    assert sum(1 for n, _ in model.named_parameters() if "lora_A" in n) > 0


def test_two_node_dry_run_writes_the_launch_files(tmp_path):
    """`qfit run --num-gpus 2 --num-machines 2 --machine-rank 1 --main-process-ip IP --dry-run`: the plan splits the
    effective batch over all 4 ranks, and the accelerate file is the one each node launches (num_processes is the
    total over machines, accelerate's convention); nothing is trained."""
    import json

    from click.testing import CliRunner

    from planner.cli import cli

    out = tmp_path / "node1"
    res = CliRunner().invoke(cli, ["run", "--demo", "--num-gpus", "2", "--num-machines", "2", "--machine-rank", "1",
                                   "--main-process-ip", "10.0.0.1", "--dry-run", "--output", str(out)])
    assert res.exit_code == 0, res.output
    acc = json.loads((out / "accelerate_config.json").read_text())
    assert (acc["num_machines"], acc["machine_rank"], acc["num_processes"]) == (2, 1, 4)
    assert acc["main_process_ip"] == "10.0.0.1" and acc["rdzv_backend"] == "static"
    assert "--machine_rank 1" in res.output and "planner.train.distributed" in res.output
    plan = json.loads((out / "plan.json").read_text())
    s = plan["settings"]
    assert plan["global_batch"] == 4 * s["batch_size"] * s["grad_accum"]
    assert not (out / "adapter_model.safetensors").exists()


def test_multi_node_options_are_checked(tmp_path):
    from click.testing import CliRunner

    from planner.cli import cli

    res = CliRunner().invoke(cli, ["run", "--demo", "--num-gpus", "2", "--num-machines", "2", "--output", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--main-process-ip" in res.output and len(res.output.strip().splitlines()) == 1


def test_fsdp_on_the_cpu_is_refused_before_the_data_is_read(tmp_path):
    from click.testing import CliRunner

    from planner.cli import cli

    res = CliRunner().invoke(cli, ["run", "--demo", "--num-gpus", "2", "--strategy", "fsdp", "--output", str(tmp_path / "x")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert "--strategy ddp" in res.output and not (tmp_path / "x").exists()


def test_multi_gpu_relaunch_backs_off_with_the_shared_policy(tmp_path, monkeypatch):
    """A rank that runs out of memory writes oom.json and exits; the parent applies planner.train.oom's policy
    (micro-batch halved, accumulation doubled), saves it to run_config.json and relaunches. The launcher is
    faked: no process starts, so this checks the parent's loop alone."""
    import json

    from planner.train import dist_run
    from planner.train.runner import RunOptions, run

    out = tmp_path / "run"
    launches = []

    def fake_launch(argv, env, echo):
        job = json.loads((out / dist_run.JOB_FILE).read_text())
        launches.append(job)
        if len(launches) == 1:
            (out / "oom.json").write_text(json.dumps({"rank": 1, "step": 0, "message": "CUDA out of memory. (fake)"}))
            return 3
        for r in (0, 1):
            (out / f"rank{r}.json").write_text(json.dumps({"rank": r, "steps": 2, "train_seconds": 1.0, "tokens": 10,
                                                           "loss": [{"step": 1, "loss": 2.0}]}))
        return 0

    monkeypatch.setattr(dist_run, "_launch", fake_launch)
    lines = []
    res = run(RunOptions(output=str(out), demo=True, num_gpus=2, max_steps=2, batch_size=4, effective_batch=8,
                         progress=False), echo=lines.append)
    assert res.status == "completed" and len(launches) == 2
    (event,) = res.report["oom_events"]
    assert (event["rank"], event["step"], event["micro_batch_before"], event["micro_batch_after"]) == (1, 1, 4, 2)
    assert event["grad_accum_after"] == 2 * event["grad_accum_before"] and event["resumed_from"] is None
    saved = json.loads((out / "run_config.json").read_text())
    assert (saved["settings"]["batch_size"], saved["settings"]["grad_accum"]) == (2, event["grad_accum_after"])
    assert saved["oom_events"] == [event]
    assert any(line.startswith("out of memory on rank 1 (step 1): now micro-batch 2 x accumulation") for line in lines)
