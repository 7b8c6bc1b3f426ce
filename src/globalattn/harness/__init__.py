"""The training harness: does global attention learn better?

A small pre-norm transformer (transformer.py) with interchangeable attentions (attention.py) is
trained on synthetic and real tasks (tasks/) under the same seeds and budgets (train.py, with
checkpoint.py), and ``compare.py`` runs a grid of such runs (presets.py) into tables and plots
(report.py); ``config.py`` holds what a run is.  The commands ``globalattn train`` and
``globalattn compare`` run them; docs/training.md explains the harness, docs/results.md what it found.
Nothing is imported here, so that the command line can read config.py without torch.
"""
