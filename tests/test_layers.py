"""The package's layers, read from the source: every import in soft_jax goes down the layers (or stays in its
own subpackage), no modules import each other round a cycle (imports inside functions count too), and nothing
outside the inference engine reaches for a private name of it (plan, benchmarks and tests use its public API)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
# lowest first: a subpackage may import its own modules and those of the layers before it, never after it.
# Subpackages that share a layer (inference, training) do not import each other.
LAYERS = [
    ("core",),                   # errors, atomic writes, fault points, preemption, settings, compilation cache
    ("parallel",),               # meshes, sharding rules, hosts, topologies, HLO reading
    ("models",),                 # the decoder, LoRA, quantized weights, checkpoints, tokenizers, presets
    ("data",),                   # prompt pools, exemplars, templates, filters, TFDS, benchmark sources
    ("inference", "training"),   # the engine with generate / score on it; SFT
    ("evaluation",),             # HHH, TruthfulQA and the other tasks
    ("scale",),                  # plan and memory: compiles what the layers below run
    ("experiment",),             # a run's config, inputs, work dir, signals, guard, contamination check
    ("reports",),                # report, compare, plots
    ("rounds",),                 # the round loop and its phases, sweeps
    ("cli",),
]
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}
INFERENCE = ("soft_jax.inference.engine", "soft_jax.inference.sampler", "soft_jax.inference.scorer")


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


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sources("soft_jax")}


def package_imports():
    """{module: set of soft_jax modules it imports} (`from soft_jax.x import y` counts y where y is a module)."""
    graph = {}
    for name, path in MODULES.items():
        found = set()
        for module, names in imports(ast.parse(path.read_text())):
            for full in [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES] or [module]:
                if full.startswith("soft_jax"):
                    assert full in MODULES, f"{path.relative_to(ROOT)} imports {full}, which does not exist"
                    found.add(full)
        graph[name] = found - {name}
    return graph


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else "soft_jax"


def test_every_module_belongs_to_a_layer():
    # soft_jax/ itself holds only __init__.py (the version) and the cli package
    assert {layer(m) for m in MODULES} - set(RANK) == {"soft_jax"}
    assert set(MODULES) - {m for m in MODULES if layer(m) in RANK} == {"soft_jax"}
    assert package_imports()["soft_jax"] == set()


def test_imports_go_down_the_layers():
    upward = []
    for module, found in package_imports().items():
        if module == "soft_jax":
            continue
        for target in found:
            if layer(target) != layer(module) and RANK[layer(target)] >= RANK[layer(module)]:
                upward.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
    assert not upward, upward


def test_no_import_cycles():
    graph = package_imports()
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_layer_test_sees_an_upward_import(tmp_path):
    # what the tests above read: an import of a higher layer inside a function is still an import
    tree = ast.parse("def f():\n    from soft_jax.rounds import loop\n")
    assert list(imports(tree)) == [("soft_jax.rounds", ["loop"])]


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


def run_config_keys() -> set[str]:
    """The run config's own top-level keys: those no settings object below `experiment` also has (`seed` is a
    TrainConfig field too, so `config.seed` in training is not a run config read)."""
    import dataclasses

    from soft_jax.data.filters import FilterConfig
    from soft_jax.experiment.config import RunConfig
    from soft_jax.inference.sampler import SamplingConfig
    from soft_jax.models.config import ModelConfig
    from soft_jax.scale.memory import Shapes
    from soft_jax.training.settings import TrainConfig

    lower = {f.name for cls in (TrainConfig, SamplingConfig, FilterConfig, ModelConfig, Shapes)
             for f in dataclasses.fields(cls)}
    return {f.name for f in dataclasses.fields(RunConfig)} - lower


def run_config_reads(tree, keys: set[str]) -> list[str]:
    """Where a module takes or reads a run config: an ml_collections import, or a run config key read off
    something that holds a config (`config.prompts`, `cfg.train.batch_size`, `self.config.curriculum`)."""
    found = [f"imports {m}" for m, _ in imports(tree) if m.split(".")[0] == "ml_collections"]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in keys:
            holder = node.value
            name = holder.id if isinstance(holder, ast.Name) else holder.attr if isinstance(
                holder, ast.Attribute) else ""
            if "config" in name.lower() or name in ("cfg", "c"):
                found.append(f"line {node.lineno} reads {name}.{node.attr}")
    return found


def test_below_experiment_nothing_takes_or_reads_the_run_config():
    # experiment defines the run config; the layers below take TrainConfig, SamplingConfig, FilterConfig, Shapes
    keys = run_config_keys()
    assert {"prompts", "train", "sampling", "curriculum", "mesh_generate", "validation"} <= keys
    found = [f"{MODULES[m].relative_to(ROOT)}: {what}" for m in MODULES
             if layer(m) in RANK and RANK[layer(m)] < RANK["experiment"]
             for what in run_config_reads(ast.parse(MODULES[m].read_text()), keys)]
    assert not found, found


def test_the_layer_test_sees_a_run_config_read():
    keys = run_config_keys()
    assert run_config_reads(ast.parse("def f(config):\n    return config.train.batch_size\n"), keys) == [
        "line 2 reads config.train"]
    assert run_config_reads(ast.parse("def f(self):\n    return self.config.mesh_generate\n"), keys) == [
        "line 2 reads config.mesh_generate"]
    assert run_config_reads(ast.parse("import ml_collections\n"), keys) == ["imports ml_collections"]
    # a TrainConfig's seed is not the run config's
    assert run_config_reads(ast.parse("def f(config):\n    return config.seed\n"), keys) == []


# Modules whose tests are in another module's test file (each file exists and names the module): what is left of
# tests grouped by topic. A new module gets its own tests/<package>/test_<module>.py; this list only shrinks.
TESTED_WITH = {
    "soft_jax.cli.commands": "tests/cli/test_cli.py",
    "soft_jax.core.compile_cache": "tests/cli/test_cli.py",
    "soft_jax.core.errors": "tests/experiment/test_config.py",
    "soft_jax.core.faults": "tests/rounds/test_gcs_run.py",
    "soft_jax.core.io_utils": "tests/rounds/test_faults.py",
    "soft_jax.core.preemption": "tests/rounds/test_faults.py",
    "soft_jax.data.templates": "tests/data/test_data.py",
    "soft_jax.experiment.inputs": "tests/experiment/test_preflight.py",
    "soft_jax.models.config": "tests/models/test_lora.py",
    "soft_jax.models.presets": "tests/rounds/test_gcs_run.py",
    "soft_jax.models.safetensors_io": "tests/models/test_lora.py",
    "soft_jax.parallel.hlo": "tests/scale/test_plan.py",
    "soft_jax.reports.plots": "tests/reports/test_compare.py",
    "soft_jax.reports.report": "tests/reports/test_compare.py",
    "soft_jax.rounds.curriculum": "tests/rounds/test_loop.py",
    "soft_jax.rounds.round_eval": "tests/rounds/test_loop.py",
    "soft_jax.rounds.selfalign": "tests/rounds/test_loop.py",
}


def own_test_file(module: str) -> pathlib.Path:
    """tests/<package>/test_<module>.py; a package's own code: tests/<package>/test_<package>.py; soft_jax.cli:
    tests/cli/test_cli.py."""
    parts = module.split(".")[1:]
    folder = parts[0] if len(parts) > 1 or MODULES[module].name == "__init__.py" or parts == ["cli"] else ""
    return ROOT / "tests" / folder / f"test_{parts[-1]}.py"


def test_every_module_has_its_test_file():
    missing = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        if module == "soft_jax" or not any(isinstance(n, ast.FunctionDef) for n in ast.walk(tree)):
            continue  # the version, package inits that only re-export, a module of one data class
        if own_test_file(module).exists():
            assert module not in TESTED_WITH, f"{module} has its own test file now: drop it from TESTED_WITH"
            continue
        other = ROOT / TESTED_WITH.get(module, "-")
        if not other.is_file() or module.rsplit(".", 1)[1] not in other.read_text():
            missing.append(f"{module}: no {own_test_file(module).relative_to(ROOT)}")
    assert not missing, missing


def test_no_file_over_600_lines_and_no_function_over_100():
    found = []
    for path in MODULES.values():
        text = path.read_text()
        if text.count("\n") > 600:
            found.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                found.append(f"{path.relative_to(ROOT)}: {node.name} is {node.end_lineno - node.lineno + 1} lines")
    assert not found, found
