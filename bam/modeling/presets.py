"""Named shapes for `bam init`: a fresh dense model is a preset (or a config file) plus a tokenizer.

Every preset is a dense parallel-block model (METHOD.md section 2: BAM's seeds use the parallel
block), RMSNorm, SwiGLU, RoPE, untied embeddings. The vocabulary always comes from the tokenizer,
so a preset only fixes the transformer's shape:

    tiny   d=64,  2 layers,  4 heads, ctx 256   ~0.1M non-embedding params: tests, trains in seconds
    small  d=160, 4 layers,  5 heads, ctx 512   ~1.2M non-embedding params: the 15-minute CPU demo
    base   d=768, 12 layers, 12 heads, ctx 2048 ~85M non-embedding params (~110M with a 16k vocab)

FFN widths are multiples of 16 so grouped-GEMM expert dispatch keeps its 16-byte alignment after
the model is mixed into an MoE.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bam.modeling.config import config_from_dict
from bam.modeling.config import BamConfig
from bam.errors import BamError

PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=256),
    "small": dict(hidden_size=160, intermediate_size=432, num_hidden_layers=4, num_attention_heads=5,
                  max_position_embeddings=512),
    "base": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=2048),
}

# What every preset shares; a config file starts from these too, so it only names what it changes.
DEFAULTS = dict(block="parallel", norm="rmsnorm", tie_word_embeddings=False, n_attn_experts=1,
                n_ffn_experts=1, use_cache=True)


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_fields(name: str) -> dict:
    if name not in PRESETS:
        raise BamError(f"preset {name!r}: unknown, expected one of {', '.join(PRESETS)}")
    return {**DEFAULTS, **PRESETS[name]}


def config_file_fields(path: str | Path) -> dict:
    """Fields from a JSON or YAML file of BamConfig fields; unknown field names are refused."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BamError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BamError(f"{path}: cannot be read ({err})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # noqa: PLC0415  (only config files need it)

            fields = yaml.safe_load(text)
        else:
            fields = json.loads(text)
    except Exception as err:  # yaml and json raise different types for a malformed file
        raise BamError(f"{path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                       f"({str(err).splitlines()[0]})") from None
    if not isinstance(fields, dict):
        raise BamError(f"{path}: expected a mapping of BamConfig fields")
    known = {f.name for f in dataclasses.fields(BamConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise BamError(f"{path}: unknown config field {unknown[0]!r} (see bam/modeling/config.py for the fields)")
    return {**DEFAULTS, **fields}


def build_config(fields: dict, tokenizer, where: str) -> BamConfig:
    """A validated BamConfig whose vocabulary and special token ids match `tokenizer`.

    A config may ask for a larger vocabulary than the tokenizer's (padding rows, e.g. to a multiple
    of 64 for speed), never a smaller one: the tokenizer would emit ids the model cannot embed.
    """
    n_tokens = len(tokenizer)
    fields = dict(fields)
    vocab_size = fields.get("vocab_size", n_tokens)
    if isinstance(vocab_size, int) and vocab_size < n_tokens:
        raise BamError(f"{where}: vocab_size={vocab_size} is smaller than the tokenizer's {n_tokens} tokens")
    fields["vocab_size"] = vocab_size
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name, None)
        if fields.get(name) is None and token_id is not None:
            fields[name] = int(token_id)
    return config_from_dict(fields, where)
