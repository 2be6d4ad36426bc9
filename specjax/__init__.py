"""specjax: language-specific drafters and speculative decoding in JAX/Flax NNX.

Importing specjax (or specjax.models / specjax.decoding) never imports TensorFlow;
only specjax.data does, because seqio needs it.
"""

from specjax.errors import SpecjaxError

__version__ = "0.1.0"
__all__ = ["SpecjaxError", "__version__"]
