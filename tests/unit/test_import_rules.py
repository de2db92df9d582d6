"""Dependency direction: math modules need torch only; the library never loads Hydra or recipes."""

import subprocess
import sys

MATH_MODULES = [
    "rlhf.types",
    "rlhf.ops",
    "rlhf.losses.policy",
    "rlhf.losses.kl",
    "rlhf.losses.reduce",
    "rlhf.losses.sft",
    "rlhf.losses.rollout_correction",
    "rlhf.losses.distill",
    "rlhf.advantages",
    "rlhf.shaping",
]
LIBRARY_MODULES = MATH_MODULES + [
    "rlhf.config",
    "rlhf.models.load",
    "rlhf.models.forward",
    "rlhf.models.reference",
    "rlhf.rollout.hf",
    "rlhf.rollout.vllm",
    "rlhf.data.chat",
    "rlhf.data.load",
    "rlhf.data.collate",
    "rlhf.scoring",
    "rlhf.checkpoint",
    "rlhf.metrics",
    "rlhf.loggers",
    "rlhf.plots",
    "rlhf.runtime",
    "rlhf.distributed",
    "rlhf.eval.accuracy",
]


def _loaded_roots(modules: list[str]) -> set[str]:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_math_modules_import_torch_only():
    roots = _loaded_roots(MATH_MODULES)
    assert "torch" in roots
    for heavy in ("transformers", "deepspeed", "hydra", "datasets", "trl", "peft", "wandb"):
        assert heavy not in roots, f"{heavy} is pulled in by the math modules"


def test_library_never_loads_hydra_or_recipes():
    roots = _loaded_roots(LIBRARY_MODULES)
    assert "hydra" not in roots and "recipes" not in roots
    assert "vllm" not in roots  # imported only when rollout.engine=vllm asks for it
