"""The jobs: orchestration only, each a `run(config, workdir)` that `specjax.main` dispatches to
(`generate`, `distill_data`, `train` for pretrain and finetune, `eval_specbench`, `demo`).

A job reads its config, loads what it needs through the libraries (`models`, `decoding`, `data`,
`train`, `eval`) and writes its outputs; the libraries never import a job (tests/test_imports.py
checks it). `common` holds what several jobs do alike (their mesh, loading a target and its
drafters); `local_assets` builds the small checkpoints, tokenizer and question file that the
`runlocal` configs run on.
"""
