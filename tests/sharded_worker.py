"""Run by tests/test_sharded_load.py under torchrun (2 CPU processes, gloo): planner.train.sharded_load on each rank.

For every checkpoint named on the command line, each rank loads it with the sharded loader (FSDP2 over gloo,
LoRA r8 on q_proj/v_proj, seed 0), runs one forward and backward on the batch the test wrote, and saves to
OUT/<tag>-rank<r>.pt: the logits, the loss, the full (all-gathered) LoRA gradients, this rank's local shard
sizes, and the loader's facts; then one AdamW step (lr 1e-2) and the loss after it, and rank 0 saves the adapter to
OUT/<tag>-adapter (save_adapter: only the LoRA weights are gathered). Not a test module (no test_ prefix).
"""

import sys
from pathlib import Path


def main(out_dir: str, cpu_offload: str, *checkpoints: str) -> None:
    import torch
    import torch.distributed as dist
    from peft import LoraConfig

    from planner.train.sharded_load import load_sharded, save_adapter

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(out_dir)
    ids = torch.load(out / "batch.pt")
    for ckpt in checkpoints:
        tag = Path(ckpt).name
        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        stats: dict = {}
        # checkpointing on in the on-device case (recompute changes no number), off with offload: both paths run
        model = load_sharded(ckpt, cfg, double_quant=True, cpu_offload=cpu_offload == "1", stats=stats, lora_seed=0,
                             gradient_checkpointing=cpu_offload == "0")
        model.train()
        res = model(input_ids=ids, labels=ids)
        res.loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        local = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        # one optimizer step on the sharded LoRA (torch AdamW, as the FSDP recipe), then the loss again
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            after = model(input_ids=ids, labels=ids).loss
        save_adapter(model, out / f"{tag}-adapter", rank)
        torch.save({"logits": res.logits.detach(), "loss": res.loss.detach(), "grads": grads, "local": local,
                    "trainable": trainable, "stats": stats, "wrapper": type(model).__name__, "after_step": after},
                   out / f"{tag}-rank{rank}.pt")
        del model, res
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(*sys.argv[1:])
