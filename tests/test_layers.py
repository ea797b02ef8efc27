"""The inference engine's boundary, read from the source: what soft_jax/inference imports, and that nothing
outside it reaches for a private name of it (plan, benchmarks and tests use its public API)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
INFERENCE = ("soft_jax.inference.engine", "soft_jax.inference.sampler", "soft_jax.inference.scorer")
# what the engine stands on: the model, the mesh rules, the settings, errors and host transfers
BELOW_INFERENCE = ("soft_jax.inference", "soft_jax.models", "soft_jax.sharding", "soft_jax.settings",
                   "soft_jax.errors", "soft_jax.distributed")


def imports(tree):
    """(module imported, names imported from it) for every import, at module level or inside a function."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def sources(*folders):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_the_inference_engine_imports_only_what_it_stands_on():
    found = []
    for path in sources("soft_jax/inference"):
        for module, names in imports(ast.parse(path.read_text())):
            # `from soft_jax import sharding` imports soft_jax.sharding
            for full in [f"{module}.{n}" for n in names] if module == "soft_jax" else [module]:
                if full.startswith("soft_jax") and not full.startswith(BELOW_INFERENCE):
                    found.append(f"{path.relative_to(ROOT)} imports {full}")
    assert not found, found


def test_nothing_outside_inference_uses_a_private_name_of_it():
    found = []
    for path in sources("soft_jax", "benchmarks", "tests"):
        if "inference" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        aliases = set()  # the names the inference modules are bound to in this file
        for module, names in imports(tree):
            if module == "soft_jax.inference":
                aliases.update(names)
            elif module in INFERENCE:
                found += [f"{path.relative_to(ROOT)} imports {module}.{n}" for n in names if n.startswith("_")]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, found
