"""Pure loss functions: tensors in, keyword-only hyperparameters, `LossOutput` out.

Each objective computes per-token terms first and then reduces them with a reduction from
`reduce.py` and a normalizer that the recipe counts once per optimizer step.
"""
