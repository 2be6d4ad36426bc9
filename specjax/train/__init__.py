"""Drafter training: settings (settings.py: TrainerSettings, AcceptanceSettings), losses,
optimizer, train step, checkpoints, metric writers and the trainer's batches and evaluation
(the `pretrain` and `finetune` jobs' loop is specjax/jobs/train.py). Importing this package
loads no TensorFlow; the trainer's batches do."""
