"""`qfit run --sample-prompt TEXT`: after training, a short greedy completion of TEXT by the tuned model (the
4-bit base with the trained adapter), with the prompt formatted as the training rows were (the Alpaca template,
the tokenizer's chat template, or plain text), so the completion shows what the adapter learned.

Module level is light; torch is imported inside.
"""

from __future__ import annotations

from planner import data as qdata
from planner.train.options import SAMPLE_MAX_NEW_TOKENS


def format_prompt(prompt: str, fmt: str, tokenizer) -> str:
    """The prompt as a training row of format `fmt` presents it, up to where the response starts."""
    if fmt == "alpaca":
        return qdata.alpaca_segments({"instruction": prompt, "input": "", "output": ""})[0][0]
    if fmt == "chat":
        if qdata.has_chat_template(tokenizer):
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        return qdata.FALLBACK_CHAT_TURN.format(role="User", content=prompt) + qdata.FALLBACK_CHAT_PROMPT
    return prompt


def generate_sample(model, tokenizer, prompt: str, fmt: str, compute_dtype: str,
                    max_new_tokens: int = SAMPLE_MAX_NEW_TOKENS) -> dict:
    """{"prompt", "formatted_prompt", "completion", "max_new_tokens", "decoding"}: greedy decoding, no sampling."""
    import torch

    from planner.train.stack import TORCH_DTYPES

    text = format_prompt(prompt, fmt, tokenizer)
    device = next(model.parameters()).device
    ids = tokenizer(text, return_tensors="pt").to(device)
    compute = TORCH_DTYPES[compute_dtype]  # as in training (autocast in the compute dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=compute):
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    finally:
        model.train(was_training)
    completion = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return {"prompt": prompt, "formatted_prompt": text, "completion": completion, "max_new_tokens": max_new_tokens,
            "decoding": "greedy"}
