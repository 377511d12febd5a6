"""Keeps the tests that share an expensive module fixture on one pytest-xdist worker, and the
tests off the Hugging Face hub."""

import os
import shutil
import sys
import tempfile

import pytest

# The tests use files they make; nothing may reach the hub. bitsandbytes (the ref extra, which
# PEFT imports) asks the hub for a CPU kernel at import on some CPUs; offline, it doesn't.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Many tests compile the same programs: a resumed run compiles its reference run's step again, and
# every end-to-end run is a fresh interpreter. JAX's persistent compilation cache keeps them on disk
# for this session, shared by the pytest-xdist workers (spawned after this runs, so they inherit
# the variables) and by every subprocess a test starts. A size limit turns on the cache's file
# lock, which the concurrent readers and writers need. A cache the user set up is left alone.
CREATED_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  CREATED_CACHE = tempfile.mkdtemp(prefix="jlora-tests-xla-cache-")
  os.environ.update(
    JAX_COMPILATION_CACHE_DIR=CREATED_CACHE,
    JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
  )
  if "jax" in sys.modules:  # a plugin imported JAX before us: its flags were read already
    sys.modules["jax"].config.update("jax_compilation_cache_dir", CREATED_CACHE)
    sys.modules["jax"].config.update("jax_compilation_cache_max_size", 8 << 30)
    sys.modules["jax"].config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

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
  "tunix_checkpoint",
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


def pytest_unconfigure(config):
  if CREATED_CACHE and not hasattr(config, "workerinput"):  # the process that made it
    shutil.rmtree(CREATED_CACHE, ignore_errors=True)
