"""bam: Branch-Attend-Mix. Importing it registers our model with transformers' Auto classes.

The model itself (bam.modeling.model: transformers' modeling and generation code, ~2 s and ~140 MB to
import) is imported on first use, `bam.BamForCausalLM` or an Auto class building a bam model,
so the verbs that only read and write tensors (`bam mix`, `bam inspect`) never pay for it.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from bam.modeling.config import BamConfig
from bam.errors import BamError


def __getattr__(name: str):
    if name == "BamForCausalLM":
        from bam.modeling.model import BamForCausalLM  # noqa: PLC0415

        return BamForCausalLM
    raise AttributeError(f"module 'bam' has no attribute {name!r}")


class _ImportOnUse(type):
    """Metaclass of the stand-in registered with AutoModelForCausalLM: the first attribute read
    from it (`from_pretrained`, `_from_config`, ...) imports the real class, registers it in the
    stand-in's place, and is answered by it."""

    def __getattr__(cls, name: str):
        from bam.modeling.model import BamForCausalLM  # noqa: PLC0415

        AutoModelForCausalLM.register(BamConfig, BamForCausalLM, exist_ok=True)
        return getattr(BamForCausalLM, name)

    def __call__(cls, *args, **kwargs):
        from bam.modeling.model import BamForCausalLM  # noqa: PLC0415

        return BamForCausalLM(*args, **kwargs)


class _DeferredBamForCausalLM(metaclass=_ImportOnUse):
    # What the Auto classes read without building a model: the config class it belongs to, and a
    # module outside `transformers.` (which marks a model as ours, not a built-in one).
    config_class = BamConfig
    __module__ = "bam.modeling.model"


AutoConfig.register(BamConfig.model_type, BamConfig, exist_ok=True)
AutoModelForCausalLM.register(BamConfig, _DeferredBamForCausalLM, exist_ok=True)

__all__ = ["BamConfig", "BamForCausalLM", "BamError"]
