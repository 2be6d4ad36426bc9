"""Plain and speculative decoding in one jitted loop each; sampling; acceptance metrics."""
from specjax.decoding.decoder import DecodeResult, Decoder
from specjax.decoding.sampling import SamplingMode, processed_probs

__all__ = ["DecodeResult", "Decoder", "SamplingMode", "processed_probs"]
