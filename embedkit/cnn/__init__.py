"""Baselines the embeddings are compared against: a log-mel CNN trained from scratch
(``train.train_cnn``) and fine-tuning of a pretrained backbone (``finetune.finetune``).

Modules: loop (the training engine: TrainConfig, RunOptions, the Task interface, folds, resume,
metrics), train (the scratch-CNN task), finetune (the fine-tuning task: new head, freeze /
unfreeze), runs (run directories, identity checks, process settings), features (log-mel, caches,
normalisation), augment (waveform / SpecAugment / mixup), data (crops, batches, prefetch,
augmentation pool), model (network + model file). Importing this package imports no torch.
"""
