"""Tokenizers: a transformers tokenizer from an HF directory, or built from GGUF metadata without torch.

transformers' own GGUF path (`AutoTokenizer.from_pretrained(..., gguf_file=...)`) reads the file with a
reader that imports torch; the install without the test extra has no torch, so the metadata is read here
with `gguf.GGUFReader` and handed to transformers' tokenizer converter.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

from soft_jax.core.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
# transformers' tokenizer-config name -> the GGUF metadata key holding that token's id
SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                  "pad_token": "padding_token_id"}


def from_hf_dir(path: str):
    """The directory's tokenizer, or None when it has no tokenizer files."""
    if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def from_gguf(path: str, fields: dict):
    """A fast tokenizer built from the GGUF's tokenizer.* metadata (fields: key -> decoded contents)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    if "tokenizer.ggml.tokens" not in fields:
        raise UserError(f"{path}: the GGUF has no tokenizer metadata; pass an HF directory with tokenizer files")
    groups = {group: {name: fields[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in fields}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, config = groups["tokenizer"], groups["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
    for name, key in SPECIAL_TOKENS.items():
        token_id = fields.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(fields["general.architecture"], tokenizer_dict)
    except Exception as e:  # noqa: BLE001 - the converter raises assorted errors for vocabularies it does not know
        raise UserError(f"{path}: cannot build a tokenizer from the GGUF metadata ({type(e).__name__}: {e}); "
                        "pass an HF checkpoint directory with tokenizer files instead") from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


CACHE_FORMAT = "1"  # bump when from_gguf changes what it builds


def cached_gguf(path: str, build):
    """The GGUF's tokenizer from the cache (~/.cache/soft_jax/tokenizers), else build() saved there first.

    Building it means parsing every metadata field of the GGUF (slow for a large vocabulary); the saved
    tokenizer.json loads much faster. The cache key is the file's path, size and mtime."""
    from transformers import PreTrainedTokenizerFast

    from soft_jax.core import io_utils

    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{CACHE_FORMAT}".encode()).hexdigest()
    directory = io_utils.cache_dir("tokenizers", key[:16])
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        try:
            return PreTrainedTokenizerFast.from_pretrained(directory)
        except Exception:  # noqa: BLE001 - a damaged cache entry: rebuild it below
            shutil.rmtree(directory, ignore_errors=True)
    tokenizer, tmp = build(), None
    try:  # saved to a temp dir, then renamed: a concurrent or killed writer never leaves half an entry
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", dir=os.path.dirname(directory))
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, directory)
    except OSError:  # a read-only or full cache dir, or another process saved it first: only costs speed
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
