"""The ZAYA1 model: CCA attention, ZAYA1 router + experts, decode cache, checkpoint layouts."""
from .cache import ZayaCache
from .modeling import ZayaForCausalLM, ZayaModel

__all__ = ["ZayaForCausalLM", "ZayaModel", "ZayaCache"]
