"""The offline tasks of the benchmarks and the main job: small T5s on bundled data, no hub.

Not part of the installed package (``ginger_hf`` is the optimizer and its integration); the
scripts, tests and recipes of a clone put ``recipes/`` on ``sys.path`` and import
``offline_tasks.proxy`` (models, data, tokenizer, pre-trained checkpoint) and
``offline_tasks.summarization`` (preprocessing and ROUGE, shared with the summarization recipe),
``offline_tasks.vision`` (CIFAR-stem ResNets, augmentation and the digits task, shared with the image
recipe) and ``offline_tasks.config_file`` (the recipes' YAML/JSON argument files).
"""
