"""The one fake-quant reference: primitives, quantizers, quantized modules, ``quantize_``, groups."""

from quest_export.quant.groups import GroupContext, group_timesteps
from quest_export.quant.model import QuantizedUNet, QuantMode, QuantPlan, plan_quantization, quantize_

__all__ = [
    "GroupContext",
    "QuantMode",
    "QuantPlan",
    "QuantizedUNet",
    "group_timesteps",
    "plan_quantization",
    "quantize_",
]
