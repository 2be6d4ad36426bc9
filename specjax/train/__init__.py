"""Drafter training: losses, optimizer, train step, checkpoints, metric writers and the trainer
(`pretrain` and `finetune` jobs). Importing this package loads no TensorFlow; the trainer does."""
