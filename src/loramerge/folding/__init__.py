"""The fold pipeline: LoRA deltas into float or 4-bit base weights, streamed; and extraction back to LoRA."""
