"""Plain and speculative decoding in one jitted loop each; sampling; acceptance metrics."""

from specjax.decoding.decoder import DecodeResult, Decoder, DecodingSettings
from specjax.decoding.sampling import SamplingMode, processed_probs

__all__ = ["DecodeResult", "Decoder", "DecodingSettings", "SamplingMode", "processed_probs"]
