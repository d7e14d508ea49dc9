import torch, transformers
from transformers import AutoModelForCausalLM
from planner.exact import resolve
from planner.train import stack
for name in ("gemma-2-2b", "phi-3-mini", "mistral-7b"):
    spec, cfg = resolve(name)
    config = stack.hf_config(cfg, 2)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    print(transformers.__version__, name, m.config._attn_implementation)
