"""How many times one training step synchronises the GPU, by method (issue 18: lora-8bit's overlap exponent).

  PYTHONPATH=/tmp/site python3 calibration/logs/sync_check.py

A small Llama (4 layers, random weights) is saved to /dev/shm and loaded as a user would: 4-bit NF4 (qlora), 8-bit
LLM.int8 (lora-8bit) or bf16 (lora), prepared for k-bit training, LoRA on every linear. One step (forward, backward)
runs under torch.cuda.set_sync_debug_mode("warn"), which warns on every synchronising CUDA call; the warnings are
counted and the line that raised the most is printed. Needs a CUDA GPU."""

import collections
import tempfile
import warnings


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=4096)
    path = tempfile.mkdtemp(dir="/dev/shm")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    quant = {"qlora": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
             "lora-8bit": BitsAndBytesConfig(load_in_8bit=True), "lora": None}
    ids = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda")
    for method, q in quant.items():
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=q, device_map={"": 0})
        if q is not None:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
        model.train()
        for phase in ("warm-up", "counted"):
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn" if phase == "counted" else "default")
                loss = model(input_ids=ids, labels=ids).loss
                fwd = sum("synchroniz" in str(w.message) for w in caught)
                loss.backward()
                torch.cuda.set_sync_debug_mode("default")
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            where = collections.Counter(f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in syncs)
        print(f"[sync] {method}: {fwd} synchronising calls in the forward, {len(syncs) - fwd} in the backward; "
              f"{cfg.num_hidden_layers * 7} decoder linears; most from {where.most_common(3)}", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
