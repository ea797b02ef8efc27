"""Tokenizers: a transformers tokenizer from an HF directory, or built from GGUF metadata without torch.

transformers' own GGUF path (`AutoTokenizer.from_pretrained(..., gguf_file=...)`) reads the file with a
reader that imports torch; the install without the test extra has no torch, so the metadata is read here
with `gguf.GGUFReader` and handed to transformers' tokenizer converter.
"""

from __future__ import annotations

import os

from soft_jax.errors import UserError

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
    except Exception as e:  # the converter raises assorted errors for vocabularies it does not know
        raise UserError(f"{path}: cannot build a tokenizer from the GGUF metadata ({type(e).__name__}: {e}); "
                        "pass an HF checkpoint directory with tokenizer files instead") from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
