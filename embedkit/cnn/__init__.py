"""Baselines the embeddings are compared against: a log-mel CNN trained from scratch
(``train.train_cnn``) and fine-tuning of a pretrained backbone (``finetune.finetune``).

Modules: features (log-mel, caches, normalisation), augment (waveform / SpecAugment / mixup),
data (crops, batches, prefetch, augmentation pool), model (network + model file), train (the
loop, folds, resume), runs (run directories, identity checks), finetune (new head, freeze /
unfreeze). Importing this package imports no torch.
"""
