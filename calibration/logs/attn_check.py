"""Which attention kernel transformers picks for an architecture built from its qfit profile (run on the GPU
machine and locally: calibration/logs/attn-check-h200.txt holds the GPU machine's answer)."""


def main() -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from planner.exact import resolve
    from planner.train import stack

    for name in ("gemma-2-2b", "phi-3-mini", "mistral-7b"):
        _, cfg = resolve(name)
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(stack.hf_config(cfg, 2), dtype=torch.bfloat16)
        print(transformers.__version__, name, m.config._attn_implementation)


if __name__ == "__main__":
    main()
