"""What bam takes from transformers that has moved between the releases bam supports: one place.

transformers 5.24 renamed the KV cache from `past_key_values` to `cache` everywhere at once: the
field of every `ModelOutput`, the keyword `generate()` passes to `forward`, the keys that Trainer
and accelerate skip. bam never spells the name itself: `cache_name()` is read off upstream's own output
class, our outputs inherit that class's fields, and `forward` takes the cache under either name,
so one bam runs on releases before and after the rename. A release that renames it again fails
here, when the model is imported, with the reason (tests/test_model.py checks this module against the installed
transformers).

This file is bundled with the remote code of `bam export --format hf` (it is imported by
bam/modeling/model.py), so an exported directory adapts to the transformers of whoever loads it.
"""

from __future__ import annotations

import functools
from dataclasses import fields

# Every name the cache field has had, newest first. Trainer skips any of them in a model's outputs
# (BamConfig.keys_to_ignore_at_inference), so the config needs no transformers modeling import.
CACHE_NAMES = ("cache", "past_key_values")


@functools.cache
def cache_name() -> str:
    """The installed transformers' name for the KV cache, read off its own CausalLMOutputWithPast."""
    # Imported here, not at the top: on older 5.x releases modeling_outputs pulls in the generation
    # code, which `bam mix` and `bam inspect` (they import the config, never the model) must not pay.
    from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: PLC0415

    names = [f.name for f in fields(CausalLMOutputWithPast)]
    for name in CACHE_NAMES:
        if name in names:
            return name
    raise ImportError(f"bam: transformers' CausalLMOutputWithPast has fields {names} and none of "
                      f"{CACHE_NAMES}: this transformers release renamed the KV cache again; "
                      f"add the new name to bam/modeling/transformers_compat.py")


def cache_argument(cache, kwargs: dict):
    """The KV cache a caller passed, under the current name or the one before it.

    transformers before 5.24 (and code written for it) passes `past_key_values=`; 5.24 and later
    pass `cache=`. Pops the old name from `kwargs`.
    """
    old = kwargs.pop("past_key_values", None)
    if old is not None and cache is not None:
        raise ValueError("both `cache` and `past_key_values` were given: pass the KV cache once")
    return cache if cache is not None else old
