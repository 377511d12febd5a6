"""The trainer and its command-line tools (`python -m train.sft`, `train.generate`, `train.launch`)."""

import os

# jlora needs only transformers' tokenizers and configs, never its PyTorch models, so the
# "PyTorch was not found. Models won't be available" advice (printed twice: transformers'
# __init__ runs twice) only alarms a user whose install is complete. setdefault keeps a user's own
# setting (an empty TRANSFORMERS_NO_ADVISORY_WARNINGS shows the advice again).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
