"""qfit: plan, calibrate and run QLoRA fine-tuning on one GPU."""

__version__ = "0.1.0"
