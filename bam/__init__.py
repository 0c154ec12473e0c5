"""bam: Branch-Attend-Mix. Importing it registers our model with transformers' Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from bam.config import BamConfig
from bam.errors import BamError
from bam.model import BamForCausalLM

AutoConfig.register(BamConfig.model_type, BamConfig, exist_ok=True)
AutoModelForCausalLM.register(BamConfig, BamForCausalLM, exist_ok=True)

__all__ = ["BamConfig", "BamForCausalLM", "BamError"]
