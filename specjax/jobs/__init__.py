"""The jobs: orchestration only, each a `run(config, workdir)` that `specjax.main` dispatches to.

A job reads its config, loads what it needs through the libraries (`models`, `decoding`, `data`,
`train`, `eval`) and writes its outputs; the libraries never import a job. `local_assets` builds
the small checkpoints, tokenizer and question file that the `runlocal` configs run on.
"""
