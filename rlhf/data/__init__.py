"""Datasets (synthetic tasks and user files through one loader), collators and samplers."""
