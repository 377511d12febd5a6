"""Keeps the tests that share an expensive module fixture on one pytest-xdist worker, and the
tests off the Hugging Face hub."""

import os

import pytest

# The tests use files they make; nothing may reach the hub. bitsandbytes (the ref extra, which
# PEFT imports) asks the hub for a CPU kernel at import on some CPUs; offline, it doesn't.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Module-scoped fixtures that cost tens of seconds each: a multi-process training run, a full
# `train.sft` run, an adapted model with its exports, a converted checkpoint per model family,
# tiny GGUFs per architecture. Under `pytest -n 2` every worker that runs a test using one builds
# its own copy, so a split group pays twice. With `--dist loadgroup` (pyproject.toml) each group
# below runs on one worker; every other test is still spread over the workers as it comes.
SHARED_FIXTURES = (
  "two",
  "finished",
  "adapted",
  "family",
  "tiny_ggufs",
  "served",
  "uninterrupted",
  "bad_input_files",
)


# tryfirst: pytest-xdist reads the xdist_group marks in its own collection hook, so they must be
# on the items before it runs.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  for item in items:
    for name in SHARED_FIXTURES:
      if name in item.fixturenames:
        # A parametrized module fixture is built once per parameter: one group per parameter.
        param = getattr(item, "callspec", None) and item.callspec.params.get(name)
        group = f"{item.module.__name__}:{name}" + (f":{param}" if param is not None else "")
        item.add_marker(pytest.mark.xdist_group(group))
        break
