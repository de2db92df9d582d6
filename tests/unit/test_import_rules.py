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
    "rlhf.rollout.engine",
    "rlhf.rollout.sampling",
    "rlhf.rollout.hf",
    "rlhf.rollout.vllm",
    "rlhf.update",
    "rlhf.distributed.collectives",
    "rlhf.data.chat",
    "rlhf.data.load",
    "rlhf.data.collate",
    "rlhf.scoring",
    "rlhf.checkpoint",
    "rlhf.metrics",
    "rlhf.loggers",
    "rlhf.plots",
    "rlhf.rollout.prompts",
    "rlhf.rollout.records",
    "rlhf.eval.heldout",
    "rlhf.overrides",
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


def test_no_engine_branches_outside_the_rollout_package():
    """Recipes, evaluation and the library hold a RolloutEngine and never ask which one it is."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[2]
    branch = re.compile(r"\bvllm\s*=|\bvllm is (not )?None|\bengine is (not )?None|start_engine\(")
    offenders = []
    for folder in ("rlhf", "recipes"):
        for path in (root / folder).rglob("*.py"):
            if path.parent.name == "rollout" or path.name == "config.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if branch.search(line):
                    offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
