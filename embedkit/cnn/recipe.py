"""The scratch CNN's default recipe: the best measured on gtzan_mini (5-fold CV, the ablation of
``bench/bench_cnn_recipe.py``, results in bench/results/bench_cnn_recipe.json): 0.887 over three
5-fold splits (0.91 / 0.87 / 0.88 on fold seeds 0 / 1 / 2), against 0.877 with 36 epochs and
0.837 with 24 (every split better with more epochs; 11 of the 15 paired folds up at 48, 1 down),
at twice the 24-epoch training time; its network step costs a quarter of the previous
44.1 kHz / 128-mel recipe's.

One place for it: ``train_cnn``'s defaults, ``embedkit train-cnn``'s option defaults and the CNN
stage of ``embedkit run`` all read these values. Plain values, so the CLI reads them without
importing the training code.

- features: the source's 22.05 kHz (nothing above 11 kHz exists in it), n_fft 1024, hop 512,
  96 mels;
- network: filters 24-48-96-128 (the width that moved every paired fold up or left it equal);
- training: 48 epochs at lr 3e-3 with cosine decay, three random 3-5 s crops of each clip per
  epoch, and no validation part (val_size 0): the 15 % of each training part early stopping
  held out trains too and the last epoch is kept. Early stopping saved nothing with a cosine
  decay at lr 1e-3 (never triggered; best epoch 18-24 of 24 in all 10 folds) and cost accuracy
  at lr 3e-3 (two folds stopped at epochs 15 and 21 and were the run's worst). At 24 epochs the
  network still under-fitted (last-epoch accuracy on its training crops 0.82-0.91);
- augmentation: SpecAugment, 2 masks of up to 12 of the 96 bands and 2 of up to 20 frames
  (0.46 s at 43 frames/s); its widths are ``AugmentConfig``'s defaults.
"""

from __future__ import annotations

#: TrainConfig fields that differ from its defaults
TRAIN = {"epochs": 48, "lr": 3e-3, "lr_schedule": "cosine", "val_size": 0.0, "crops_per_clip": 3}
#: FeatureConfig fields
FEATURES = {"sample_rate": 22050, "n_fft": 1024, "hop_length": 512, "n_mels": 96}
#: filters per conv block
CHANNELS = (24, 48, 96, 128)
#: the augmentations on (``AugmentConfig.parse``)
AUGMENT = "specaugment"
