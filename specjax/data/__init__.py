"""Training data for drafters: parallel text, self-distillation records, seqio tasks.

specjax.data.parallel and specjax.data.selfdistill stay free of TensorFlow; the seqio parts
(vocab, tasks) import it, so they load on first use of their names here (PEP 562), and
`import specjax.data.parallel` does not pay for TensorFlow.
"""

import importlib

_LAZY = {
  "HFVocabulary": "specjax.data.vocab",
  "sentencepiece_vocabulary": "specjax.data.vocab",
  "check_vocabulary_matches_target": "specjax.data.vocab",
  "vocabulary_matches_target": "specjax.data.vocab",
  "register_tasks": "specjax.data.tasks",
  "get_dataset": "specjax.data.tasks",
  "get_tf_dataset": "specjax.data.tasks",
  "registered_names": "specjax.data.tasks",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'specjax.data' has no attribute {name!r}")
