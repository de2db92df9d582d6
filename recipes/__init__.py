"""Recipes: one readable training script per method, each runnable with python, torchrun or deepspeed."""
