"""LoRA adapters on a frozen Llama: added, merged, and written in the HF PEFT format.

    model = lora.add_adapters(model, rank=64, alpha=16, targets=lora.TARGETS, seed=0)
    # training.train then trains the adapters only: gradients and Adam moments for them alone
    lora.merged(model)                 # the same model with A @ B * alpha / rank folded into each kernel
    lora.export_peft(model, "out")     # adapter_config.json + adapter_model.safetensors, which `peft` loads

Each targeted Linear (matched by its module name: q_proj, ..., down_proj) gets `lora = Adapter(a, b, alpha /
rank)`: `a` [in, rank] drawn as PEFT draws it (uniform, bound 1 / sqrt(in)), `b` [rank, out] zeros, so a new
adapter leaves the model's outputs unchanged. With stacked layers (ModelConfig.scan_layers) each adapter
array has the leading "layers" axis and the scan carries it with the layer's weights.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from soft_jax.core import io_utils, storage
from soft_jax.core.errors import UserError
from soft_jax.core.io_utils import write_dir
from soft_jax.models import safetensors_io
from soft_jax.models.llama import LAYERS, LORA_RANK, Adapter, Linear, Llama
from soft_jax.parallel import sharding as shd

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


def linears(model: Llama):
    """(path, Linear) of every projection, lm_head aside.

    Args:
        model: The Llama.

    Returns:
        A list of (path, Linear) pairs; each path is the module's nnx graph path, a tuple whose last item is
        the module name (e.g. "q_proj").
    """
    return [(path, m) for path, m in nnx.iter_graph(model) if isinstance(m, Linear) and path[0] != "lm_head"]


def has_adapters(model) -> bool:
    """Whether the NNX model holds any LoRA parameter (nnx.LoRAParam)."""
    return any(isinstance(v, nnx.LoRAParam) for _, v in nnx.iter_graph(model))


def parse_targets(targets) -> tuple[str, ...]:
    """The projection names to put adapters on.

    Args:
        targets: A comma-separated string or a sequence of module names among TARGETS.

    Returns:
        The names, stripped, empty ones dropped.

    Raises:
        UserError: When no name is left, or a name is not in TARGETS.
    """
    names = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip())
    bad = sorted(set(names) - set(TARGETS))
    if not names or bad:
        raise UserError(f"LoRA targets {', '.join(bad) or '(none)'}: give module names among {', '.join(TARGETS)}, "
                        "comma-separated")
    return names


def _draw_a(key, shape, dtype, bound):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def _zeros(key, shape, dtype, bound):
    return jnp.zeros(shape, dtype)


def add_adapters(model: Llama, rank: int, alpha: float, targets=TARGETS, seed: int = 0) -> Llama:
    """A copy of `model` (sharing its weight arrays) with a fresh adapter on each targeted projection; `model` is
    left as it is. Each adapter array is placed on its kernel's mesh by the sharding rules: `a` split like the
    kernel's input axis, `b` like its output.

    Args:
        model: The Llama; it must have no adapters yet.
        rank: The adapter rank, at least 1.
        alpha: The LoRA alpha; each adapter's output is scaled by alpha / rank.
        targets: The projection names to adapt (a comma-separated string or a sequence; see `parse_targets`).
        seed: The random seed of the `a` matrices.

    Returns:
        The new model with the adapters.

    Raises:
        UserError: For a rank below 1, a model that already has adapters, or bad target names.
    """
    if rank < 1:
        raise UserError(f"LoRA rank {rank}: must be at least 1 (0 means full fine-tuning: add no adapters)")
    if has_adapters(model):
        raise UserError("the model already has LoRA adapters; merge them first (lora.merged) to stack another")
    names = parse_targets(targets)
    model = nnx.merge(*nnx.split(model), copy=True)
    cfg = model.config
    key = jax.random.key(seed)
    for i, (path, linear) in enumerate(linears(model)):
        if path[-1] not in names:
            continue
        shape = linear.kernel.shape
        lead, (d_in, d_out) = shape[:-2], shape[-2:]
        in_axis, out_axis = linear.axes
        stacked = (LAYERS,) if lead else ()
        bound = 1.0 / np.sqrt(d_in)  # PEFT's kaiming_uniform_(a=sqrt(5)) on lora_A: U(-1/sqrt(in), 1/sqrt(in))
        mesh = getattr(getattr(linear.kernel_var[...], "sharding", None), "mesh", None)
        dtype = jnp.dtype(cfg.param_dtype)
        params = []
        for name, shape, axes in (("a", (*lead, d_in, rank), (*stacked, in_axis, LORA_RANK)),
                                  ("b", (*lead, rank, d_out), (*stacked, LORA_RANK, out_axis))):
            # made by a jitted program straight onto its sharding (every process makes its own shards); module-level
            # functions, so that the projections of one shape share a compiled program
            out = shd.named_sharding(axes, shape, mesh) if isinstance(mesh, jax.sharding.Mesh) else None
            make = jax.jit(_draw_a if name == "a" else _zeros, static_argnums=(1, 2, 3), out_shardings=out)
            params.append(nnx.LoRAParam(make(jax.random.fold_in(key, i), shape, dtype, bound), axes=axes))
        linear.lora = Adapter(*params, scale=float(alpha) / rank)
    return model


def set_dropout(model: Llama, rate: float, row_keys) -> None:
    """Switches on LoRA dropout for the forward passes of `model` (a model merged inside a train step): each
    adapter zeroes its input's entries with probability `rate` and scales the rest by 1 / (1 - rate), as PEFT's
    lora_dropout does; the kernel's own input is untouched. Every row, adapter and layer draws its own mask, from
    the row's key folded with the projection's name and the layer's index, so the masks do not depend on how the
    batch is split over devices or whether the layers are stacked.

    Args:
        model: The Llama with adapters; changed in place.
        rate: The dropout probability, in (0, 1).
        row_keys: uint32 [rows, 2]: one key's data per row of the batch the model runs on.
    """
    from soft_jax.models.llama import DropoutKeys

    cfg = model.config
    layers = jnp.arange(cfg.num_layers)
    for path, linear in linears(model):
        if linear.lora is None:
            continue
        name = TARGETS.index(path[-1])
        per_layer = jax.vmap(lambda key, layer: jax.random.key_data(
            jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key), name), layer)), in_axes=(0, None))
        if cfg.scan_layers:
            keys = jax.vmap(lambda layer: per_layer(row_keys, layer))(layers)
        else:
            keys = per_layer(row_keys, path[1])
        linear.lora.dropout = float(rate)
        linear.lora.keys = DropoutKeys(keys)


def merged(model: Llama) -> Llama:
    """A copy of `model` with each adapter folded into its kernel (kernel + a @ b * scale, in float32, stored in
    the model's parameter dtype) and no adapters: what `export_hf` writes. A quantized kernel is dequantized
    first: the merged kernel is a full-precision parameter. `model` is left as it is.

    Args:
        model: The Llama, with or without adapters.

    Returns:
        The merged copy (a plain copy when `model` has no adapters).
    """
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, state, copy=True)
    dtype = jnp.dtype(model.config.param_dtype)
    for _, linear in linears(out):
        if linear.lora is None:
            continue
        delta = jnp.matmul(linear.lora.a[...].astype(jnp.float32), linear.lora.b[...].astype(jnp.float32))
        kernel = (linear.weight(jnp.float32) + delta * linear.lora.scale).astype(
            dtype if linear.quantized else linear.kernel[...].dtype)
        if linear.quantized:
            lead = (LAYERS,) if kernel.ndim > 2 else ()
            linear.kernel = nnx.Param(kernel, axes=(*lead, *linear.axes))
        else:
            linear.kernel.set_value(kernel)
        linear.lora = None
    return out


def peft_modules(path: tuple, cfg) -> list[str]:
    """PEFT's name of the projection at `path`, per layer it holds (every layer when the layers are stacked).

    Args:
        path: The projection's nnx graph path, as `linears` gives it.
        cfg: The model's ModelConfig (scan_layers and num_layers are read).

    Returns:
        The PEFT module names, e.g. "base_model.model.model.layers.0.self_attn.q_proj", one per layer.
    """
    module = ".".join(str(p) for p in (path[1:] if cfg.scan_layers else path[2:]))
    return [f"{PEFT_PREFIX}model.layers.{i}.{module}" for i in (range(cfg.num_layers) if cfg.scan_layers
                                                                 else [path[1]])]


def peft_tensors(model: Llama) -> dict[str, np.ndarray]:
    """The adapters under PEFT's names for transformers' Llama (lora_A.weight [rank, in], lora_B.weight [out,
    rank]), per layer.

    Args:
        model: The Llama with adapters.

    Returns:
        A dict of PEFT tensor name -> float32 host array.
    """
    out = {}
    for path, linear in linears(model):
        if linear.lora is None:
            continue
        a, b = (np.asarray(jax.device_get(p[...]), np.float32) for p in (linear.lora.a, linear.lora.b))
        stacked = model.config.scan_layers
        for i, name in enumerate(peft_modules(path, model.config)):
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray((a[i] if stacked else a).T)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray((b[i] if stacked else b).T)
    return out


def adapter_settings(model: Llama) -> tuple[int, float, tuple[str, ...]]:
    """(rank, alpha, targeted module names) of the model's adapters.

    Args:
        model: The Llama with adapters.

    Returns:
        A tuple (rank, alpha, targets): the first adapter's rank and alpha, and the adapted module names in
        TARGETS order.

    Raises:
        UserError: When the model has no adapters.
    """
    found = [(path[-1], linear.lora) for path, linear in linears(model) if linear.lora is not None]
    if not found:
        raise UserError("the model has no LoRA adapters to export; train with a LoRA rank, or export it whole")
    rank, scale = found[0][1].rank, found[0][1].scale
    return rank, scale * rank, tuple(sorted({name for name, _ in found}, key=TARGETS.index))


def export_peft(model: Llama, out_dir: str, base_model: str = "") -> str:
    """Writes the adapters as an HF PEFT LoRA directory (adapter_config.json + adapter_model.safetensors)
    atomically; `peft.PeftModel.from_pretrained(base, out_dir)` loads it onto the transformers base model.

    Args:
        model: The Llama with adapters.
        out_dir: The directory to write; an existing one is replaced.
        base_model: The base model's path or name, written as base_model_name_or_path; "" writes null.

    Returns:
        `out_dir`.

    Raises:
        UserError: When the model has no adapters.
    """
    rank, alpha, targets = adapter_settings(model)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
              "base_model_name_or_path": base_model or None}
    tensors = peft_tensors(model)

    def fill(tmp):
        safetensors_io.write(os.path.join(tmp, "adapter_model.safetensors"), tensors, {"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)

    write_dir(out_dir, fill)
    return out_dir


def is_peft_dir(path: str) -> bool:
    """Whether `path` is a directory holding an adapter_config.json (an HF PEFT adapter)."""
    return storage.isfile(storage.join(path, "adapter_config.json")) if storage.is_gcs(path) else (
        os.path.isdir(path) and os.path.isfile(os.path.join(path, "adapter_config.json")))


def peft_base(path: str) -> str:
    """The base model an HF PEFT adapter directory names (`base_model_name_or_path`), as --model takes it.

    Args:
        path: The PEFT adapter directory.

    Returns:
        The base model's local path, or 'smollm2-135m'.

    Raises:
        UserError: When adapter_config.json is unreadable, the adapter is not LoRA, or the base is not a local
            model.
    """
    where = os.path.join(io_utils.local_copy(path), "adapter_config.json")
    try:
        with open(where, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: not readable as JSON ({e}); re-export the adapter") from None
    if config.get("peft_type") != "LORA":
        raise UserError(f"{where}: peft_type {config.get('peft_type')!r}; only LoRA adapters load")
    base = config.get("base_model_name_or_path") or ""
    if not base or not (storage.exists(storage.check(base, "base_model_name_or_path")) or base == "smollm2-135m"):
        raise UserError(f"{where}: base_model_name_or_path {base!r} is not a local model; set it to the base "
                        "model's HF directory, .gguf file or 'smollm2-135m'")
    return base


def load_peft(model: Llama, path: str) -> Llama:
    """`model` (the base) with the LoRA adapters of an HF PEFT directory (a copy; `model` is left as it is).

    Args:
        model: The base Llama, without adapters.
        path: The PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

    Returns:
        The copy with the adapters loaded.

    Raises:
        UserError: For rsLoRA or DoRA adapters, a missing safetensors file, missing tensors, or tensors whose
            shapes do not fit the base model.
    """
    path = io_utils.local_copy(path)
    where = os.path.join(path, "adapter_config.json")
    with open(where, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("use_rslora") or config.get("use_dora"):
        raise UserError(f"{where}: rsLoRA / DoRA adapters are not supported; export a plain LoRA adapter")
    targets = config.get("target_modules") or []
    targets = targets.split(",") if isinstance(targets, str) else targets
    tuned = add_adapters(model, int(config["r"]), float(config["lora_alpha"]), targets)
    weights = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise UserError(f"{path}: no adapter_model.safetensors; re-save the adapter with safe_serialization=True")
    tensors = safetensors_io.read(weights)
    for path_, linear in linears(tuned):
        if linear.lora is None:
            continue
        names = peft_modules(path_, tuned.config)
        for which, var in (("A", linear.lora.a), ("B", linear.lora.b)):
            missing = [n for n in names if f"{n}.lora_{which}.weight" not in tensors]
            if missing:
                raise UserError(f"{weights}: tensor {missing[0]}.lora_{which}.weight is missing; the adapter does not "
                                "match its config")
            parts = [np.asarray(tensors[f"{n}.lora_{which}.weight"], np.float32).T for n in names]
            value = (np.stack(parts) if tuned.config.scan_layers else parts[0]).astype(var[...].dtype)
            if value.shape != tuple(var.shape):
                raise UserError(f"{weights}: lora_{which} of {names[0]} has shape {value.shape}, the base implies "
                                f"{tuple(var.shape)}; the adapter belongs to another model")
            # each device (of every process) reads its own slice
            var.set_value(jax.make_array_from_callback(value.shape, var[...].sharding, lambda idx, v=value: v[idx]))
    return tuned
