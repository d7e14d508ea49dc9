"""Training-side code: the only package that imports torch, transformers, peft and bitsandbytes at module level."""
