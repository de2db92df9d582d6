"""Evaluation entry points (held-out accuracy; diversity metrics land with CD-RLHF)."""
