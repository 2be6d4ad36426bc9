"""The five features of a packed decoder-only batch, [batch, L] each, as seqio's
DecoderFeatureConverter writes them: what `data.tasks` yields and `train.step` trains on."""

BATCH_FEATURES = (
  "decoder_input_tokens",
  "decoder_target_tokens",
  "decoder_loss_weights",
  "decoder_positions",
  "decoder_segment_ids",
)
