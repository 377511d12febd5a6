"""`train.serve`: OpenAI's API over a continuous batch of mixed-adapter requests.

The server runs on a free loopback port (module fixture) over a tiny random Llama and three
adapters of different ranks and targets; the official `openai` client and raw httpx talk to it.
Reference: `train.generate.generate_ids` (the independent path: one batch per adapter, each
adapter loaded alone with jlora.load_adapter, no stack, its own KV cache), token for token.
Every request is bounded (max_tokens, client timeouts).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.models import LlamaConfig, from_pretrained
from tests.tiny import TINY_VOCAB_SIZE, random_hf_state, save_numpy_checkpoint
from train import serve
from train.engine import (
  PREFIX_BLOCK,
  AdapterError,
  Engine,
  Request,
  batch_buckets,
  prefill_batches,
  row_buckets,
)
from train.generate import chat_prompt_ids, generate_ids

CONFIG = LlamaConfig(
  vocab_size=TINY_VOCAB_SIZE,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  tie_word_embeddings=False,
  max_position_embeddings=256,
)
ADAPTERS = {
  "qv": jlora.LoraConfig(rank=2, alpha=4.0, targets=["q_proj", "v_proj"]),
  "all": jlora.LoraConfig(rank=8, alpha=8.0, targets="all-linear", use_rslora=True),
  "mlp": jlora.LoraConfig(rank=4, alpha=16.0, targets=["gate_proj", "up_proj", "down_proj"]),
  "late": jlora.LoraConfig(rank=4, alpha=4.0, targets=["k_proj", "o_proj"]),  # loaded at run time
}
PROMPTS = ["hello there", "the hat", "x"]  # 20-26 tokens with the template: one prefill bucket
STEPS = 12  # tokens of every reference; shorter requests compare with a prefix
MAX_LEN = 64  # short, so the cache's columns wrap (the engine's roll) within a test
# Ranks 2 and 4 test the zero-padding to --max-lora-rank; vLLM's rank list doesn't matter here.
pytestmark = pytest.mark.filterwarnings("ignore:save_adapter. rank")


def _random(params, seed):
  """Adapters big enough to change the greedy tokens of a random model."""
  rng = np.random.default_rng(seed)
  fill = lambda n: n.replace(  # noqa: E731
    a=jnp.asarray(0.5 * rng.standard_normal(n.a.shape), n.a.dtype),
    b=jnp.asarray(0.5 * rng.standard_normal(n.b.shape), n.b.dtype),
  )
  return jax.tree.map(lambda n: fill(n) if jlora.is_lora(n) else n, params, is_leaf=jlora.is_lora)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve")
  # Weights 3x the usual random scale, so greedy outputs vary instead of repeating one token.
  state = {k: v if "norm" in k else 3 * v for k, v in random_hf_state(CONFIG).items()}
  model_dir = save_numpy_checkpoint(root / "model", CONFIG, state)
  argv = ["--model", str(model_dir), "--max-num-seqs", "4", "--max-loras", "4"]
  args = serve.parser().parse_args(argv + ["--max-lora-rank", "8", "--max-model-len", str(MAX_LEN)])
  serve.check_args(args)
  engine, server = serve.build(args)
  params = engine.base_params
  for i, (name, cfg) in enumerate(ADAPTERS.items()):
    jlora.save_adapter(root / name, _random(jlora.apply(params, cfg, jax.random.key(i)), i), cfg)
  for name in ("qv", "all", "mlp"):  # what --adapter NAME=DIR does at start-up
    engine.load_adapter(name, str(root / name))
  narrow = dataclasses.replace(CONFIG, hidden_size=32)
  other = save_numpy_checkpoint(root / "other", narrow, random_hf_state(narrow))
  _, other_params, _ = from_pretrained(other)
  cfg = ADAPTERS["qv"]
  jlora.save_adapter(root / "other_adapter", jlora.apply(other_params, cfg, jax.random.key(9)), cfg)
  embed = jlora.LoraConfig(rank=2, targets=["embed_tokens"])
  jlora.save_adapter(root / "embed_adapter", jlora.apply(params, embed, jax.random.key(8)), embed)
  url, stop = serve.serve_in_thread(server)
  yield dict(
    url=url, root=root, model=engine.model, params=engine.base_params,
    tokenizer=server.tokenizer, engine=engine, base=str(model_dir),
  )  # fmt: skip
  stop()


RAW = "the cat sat on the mat, the end"  # a /v1/completions prompt (no chat template)


@pytest.fixture(scope="module")
def references(served):
  """{adapter: {prompt: new token ids}} from train.generate: one batch, a row per adapter and
  prompt, over jlora.stack_adapters of the adapter dirs as saved (no padding, own scales)."""
  model, params, tok = served["model"], served["params"], served["tokenizer"]
  dirs = {name: served["root"] / name for name in ADAPTERS}
  stacked = jlora.stack_adapters(dirs, params, model_config=model.config)
  prompts = {p: chat_prompt_ids(tok, p) for p in PROMPTS} | {RAW: tok.encode(RAW)}
  rows = [(name, p) for name in ["base", *ADAPTERS] for p in prompts]
  ids = generate_ids(
    model,
    stacked,
    [prompts[p] for _, p in rows],
    STEPS,
    eos_ids=[tok.eos_token_id],
    apply_fn=jlora.wrap(model.apply),
    adapter_ids=jlora.adapter_ids(stacked, [name for name, _ in rows]),
  )
  refs = {name: {} for name in ["base", *ADAPTERS]}
  for (name, p), new in zip(rows, ids):
    refs[name][p] = new
  assert refs["qv"] != refs["base"] and refs["all"] != refs["mlp"]  # the adapters matter
  return refs


def _client(served):
  from openai import OpenAI

  return OpenAI(base_url=served["url"] + "/v1", api_key="none", timeout=60, max_retries=0)


def _name(served, adapter):
  return served["base"] if adapter == "base" else adapter


def _chat(served, adapter, prompt, max_tokens=STEPS, **extra):
  return _client(served).chat.completions.create(
    model=_name(served, adapter),
    messages=[{"role": "user", "content": prompt}],
    max_tokens=max_tokens,
    temperature=0,
    **extra,
  )


def _expect(served, references, adapter, prompt, max_tokens=STEPS):
  ids = references[adapter][prompt][:max_tokens]
  return served["tokenizer"].decode(ids, skip_special_tokens=True), len(ids)


def test_models_lists_the_base_and_each_adapter_with_its_parent(served):
  models = {m.id: m for m in _client(served).models.list().data}
  assert set(models) == {served["base"], "qv", "all", "mlp"}
  assert models["qv"].parent == served["base"] and models["qv"].root == str(served["root"] / "qv")


@pytest.mark.parametrize("adapter", ["base", "qv", "all", "mlp"])
def test_greedy_chat_equals_train_generate(served, references, adapter):
  prompt = PROMPTS[1]
  reply = _chat(served, adapter, prompt)
  text, count = _expect(served, references, adapter, prompt)
  assert reply.choices[0].message.content == text
  prompt_tokens = len(chat_prompt_ids(served["tokenizer"], prompt))
  assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, count)
  assert reply.choices[0].finish_reason == "length"


def test_completions_endpoint_over_raw_http_equals_train_generate(served, references):
  tok = served["tokenizer"]
  body = {"model": "all", "prompt": RAW, "max_tokens": 6, "temperature": 0}
  response = httpx.post(served["url"] + "/v1/completions", json=body, timeout=60).json()
  text, count = _expect(served, references, "all", RAW, 6)
  assert response["choices"][0]["text"] == text
  prompt_tokens = len(tok.encode(RAW))
  assert response["usage"] == {
    "prompt_tokens": prompt_tokens,
    "completion_tokens": count,
    "total_tokens": prompt_tokens + count,
  }


def test_eight_concurrent_requests_over_three_adapters_and_base_each_equal_solo(served, references):
  jobs = [(a, PROMPTS[i % 3]) for i, a in enumerate(["qv", "all", "mlp", "base"] * 2)]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    replies = list(
      pool.map(lambda job: _chat(served, *job, max_tokens=STEPS - (hash(job) % 2)), jobs)
    )
  for (adapter, prompt), reply in zip(jobs, replies):
    n = reply.usage.completion_tokens
    assert reply.choices[0].message.content == _expect(served, references, adapter, prompt, n)[0]


def test_streaming_concatenates_to_the_non_streamed_text_with_the_same_usage(served):
  whole = _chat(served, "mlp", PROMPTS[0], seed=3)
  stream = _chat(
    served, "mlp", PROMPTS[0], stream=True, stream_options={"include_usage": True}, seed=3
  )
  chunks = list(stream)
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == whole.choices[0].message.content
  assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
  # Raw SSE on /v1/completions: data lines, then [DONE].
  body = {"model": "qv", "prompt": RAW, "max_tokens": 5, "temperature": 0, "stream": True}
  with httpx.stream("POST", served["url"] + "/v1/completions", json=body, timeout=60) as r:
    lines = [line for line in r.iter_lines() if line]
  assert lines[-1] == "data: [DONE]"
  events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
  assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_load_use_unload_reload_while_others_run(served, references):
  engine, url = served["engine"], served["url"]
  compiled = engine.step_fn._cache_size()
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    running = [pool.submit(_chat, served, "qv", p) for p in PROMPTS[:2]]
    late = {"lora_name": "late", "lora_path": str(served["root"] / "late")}
    assert httpx.post(url + "/v1/load_lora_adapter", json=late, timeout=60).status_code == 200
    reply = _chat(served, "late", PROMPTS[2])
    assert reply.choices[0].message.content == _expect(served, references, "late", PROMPTS[2])[0]
    unload = {"lora_name": "late"}
    assert httpx.post(url + "/v1/unload_lora_adapter", json=unload, timeout=60).status_code == 200
    gone = httpx.post(url + "/v1/chat/completions", json=_body("late"), timeout=60)
    assert gone.status_code == 404 and "late" in gone.json()["error"]["message"]
    assert httpx.post(url + "/v1/load_lora_adapter", json=late, timeout=60).status_code == 200
    reply = _chat(served, "late", PROMPTS[1])
    assert reply.choices[0].message.content == _expect(served, references, "late", PROMPTS[1])[0]
    for future, prompt in zip(running, PROMPTS):
      text = future.result(timeout=60).choices[0].message.content
      assert text == _expect(served, references, "qv", prompt)[0]
  assert httpx.post(url + "/v1/unload_lora_adapter", json=unload, timeout=60).status_code == 200
  assert engine.step_fn._cache_size() == compiled  # loading never recompiled the decode step


def test_adapter_for_another_base_is_refused_and_the_server_keeps_serving(served, references):
  other = {"lora_name": "other", "lora_path": str(served["root"] / "other_adapter")}
  response = httpx.post(served["url"] + "/v1/load_lora_adapter", json=other, timeout=60)
  assert response.status_code == 400
  message = response.json()["error"]["message"]
  assert "other_adapter" in message and "but base_params has (64, 64) per layer" in message
  # Adapters on the embeddings are refused by name too (the stack holds linear layers only).
  embed = {"lora_name": "embed", "lora_path": str(served["root"] / "embed_adapter")}
  response = httpx.post(served["url"] + "/v1/load_lora_adapter", json=embed, timeout=60)
  error = response.json()["error"]
  assert response.status_code == 400 and error["code"] == 400
  assert "'embed' adapts" in error["message"] and "embed_tokens" in error["message"]
  reply = _chat(served, "qv", PROMPTS[2])
  assert reply.choices[0].message.content == _expect(served, references, "qv", PROMPTS[2])[0]


def _body(model, **extra):
  return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


BAD_REQUESTS = {
  "unknown model": (_body("nope"), 404, "'nope' does not exist"),
  "negative max_tokens": (_body("qv", max_tokens=-1), 400, "max_tokens: -1"),
  "negative temperature": (_body("qv", temperature=-0.5), 400, "temperature: -0.5"),
  "top_p zero": (_body("qv", top_p=0), 400, "top_p: 0"),
  "n above one": (_body("qv", n=2), 400, "n: 2"),
  "prompt over the context": (_body("qv", max_tokens=MAX_LEN), 400, "maximum context length"),
  "no messages": ({"model": "qv", "messages": []}, 400, "messages"),
  "malformed JSON": ('{"model": "qv", ', 400, "not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_openai_shaped_errors_and_the_server_stays_up(served, case):
  body, status, message = BAD_REQUESTS[case]
  send = {"content": body} if isinstance(body, str) else {"json": body}
  response = httpx.post(served["url"] + "/v1/chat/completions", timeout=60, **send)
  assert response.status_code == status
  error = response.json()["error"]
  assert message in error["message"] and error["code"] == status and error["type"]
  assert httpx.get(served["url"] + "/v1/models", timeout=60).status_code == 200


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served, monkeypatch):
  engine = served["engine"]
  step = engine.step_fn

  def slow_step(*args):  # 50 ms a token, so the request can't finish before the disconnect
    time.sleep(0.05)
    return step(*args)

  monkeypatch.setattr(engine, "step_fn", slow_step)
  cancelled = engine.cancelled
  body = _body("all", max_tokens=MAX_LEN - 30, stream=True, temperature=0)
  with httpx.stream("POST", served["url"] + "/v1/chat/completions", json=body, timeout=60) as r:
    lines = (
      line for line in r.iter_lines() if '"content": "' in line and '"content": ""' not in line
    )
    next(lines)  # a token arrived: the request holds a slot
  deadline = time.time() + 20
  while any(engine.slots) and time.time() < deadline:
    time.sleep(0.05)
  assert not any(engine.slots)
  assert engine.cancelled == cancelled + 1  # freed early, not run to max_tokens


def test_a_lone_request_decodes_one_row_not_every_slot(served, references, monkeypatch):
  """The decode step computes the rows up to the highest live slot, rounded up to a power of two;
  a lone request sits in slot 0, so each of its steps is one row, and its text is still
  train.generate's."""
  assert row_buckets(16) == [1, 2, 4, 8, 16] and row_buckets(6) == [1, 2, 4, 6]
  assert row_buckets(1) == [1]
  engine, step, rows = served["engine"], served["engine"].step_fn, []

  def counting_step(*args):
    rows.append(args[0])
    return step(*args)

  monkeypatch.setattr(engine, "step_fn", counting_step)
  reply = _chat(served, "qv", PROMPTS[0])
  assert reply.choices[0].message.content == _expect(served, references, "qv", PROMPTS[0])[0]
  assert rows and set(rows) == {1}, rows


def test_a_prompt_that_starts_like_an_earlier_one_prefills_only_the_rest(
  served, references, monkeypatch
):
  """The second time a prompt comes (on the same adapter) its first multiples of PREFIX_BLOCK
  tokens come from the prefix cache: the prefill call gets only the rest, and the text is still
  train.generate's (the other tests send each prompt on several adapters, each with its own
  prefixes)."""
  engine, prefill, calls = served["engine"], served["engine"].prefill_fn, []

  def recording_prefill(params, prefixes, ids, *args):
    calls.append((len(prefixes), ids.shape[1]))
    return prefill(params, prefixes, ids, *args)

  monkeypatch.setattr(engine, "prefill_fn", recording_prefill)
  prompt_len = len(chat_prompt_ids(served["tokenizer"], PROMPTS[1]))
  for adapter in ("mlp", "mlp"):
    reply = _chat(served, adapter, PROMPTS[1], max_tokens=4)
    assert (
      reply.choices[0].message.content == _expect(served, references, adapter, PROMPTS[1], 4)[0]
    )
  cached = (prompt_len - 1) // PREFIX_BLOCK * PREFIX_BLOCK
  assert calls[1] == (1, engine.bucket_of(prompt_len - cached)), calls
  assert calls[1][1] < calls[0][1] or calls[0][0] == 1


def test_waiting_prompts_are_prefilled_in_power_of_two_batches_of_one_shape():
  # 13 prompts padded to 48 tokens and 2 to 16 after an 8-token cached prefix: 8 + 4 + 1 of the
  # first, 2 of the second.
  padded = [(0, 48)] * 6 + [(8, 16)] + [(0, 48)] * 7 + [(8, 16)]
  batches = prefill_batches(padded, 16)
  assert [len(b) for b in batches] == [8, 4, 1, 2]
  assert sorted(i for b in batches for i in b) == list(range(15))
  assert all(len({padded[i] for i in b}) == 1 for b in batches)
  # At most PREFILL_TOKENS (1024) padded tokens a call, but always one prompt.
  assert batch_buckets(16, 48) == [1, 2, 4, 8, 16] and batch_buckets(16, 256) == [1, 2, 4]
  assert batch_buckets(6, 16) == [1, 2, 4] and batch_buckets(16, 2048) == [1]


def test_arrivals_are_gathered_only_while_as_many_as_just_finished_may_still_come():
  # Engine._gather_left on a bare state: 4 slots, 3 free; hand-computed waits.
  from collections import deque
  from types import SimpleNamespace

  from train.engine import GATHER_S, RECENT_S

  now = time.monotonic()
  request = lambda age: Request([1], "base", 1, print, arrived=now - age)  # noqa: E731
  state = lambda waiting, finished: SimpleNamespace(  # noqa: E731
    slots=[None, None, None, object()], waiting=deque(waiting), finished=deque(finished)
  )
  left = lambda *a: Engine._gather_left(state(*a))  # noqa: E731
  assert 0 < left([request(0)], [now] * 3) <= GATHER_S  # 3 just finished, 1 arrived: wait
  assert left([request(0)] * 3, [now] * 3) == 0  # all of them came
  assert left([request(0)] * 2, [now] * 9) > 0 and left([request(0)] * 3, [now] * 9) == 0  # free
  assert left([request(GATHER_S)], [now] * 3) == 0  # waited long enough
  assert left([request(0)], [now - 2 * RECENT_S] * 3) == 0  # finished long ago: a lone client
  assert left([request(0)], [now]) == 0 and left([], [now] * 3) == 0


def test_lora_targets_must_name_linear_layers(served):
  with pytest.raises(serve.UserError) as error:
    serve.lora_targets("q_proj,embed_tokens", served["params"])
  assert str(error.value) == (
    "--lora-targets: 'q_proj,embed_tokens' is not valid; expected all-linear or comma-separated "
    "names of the model's linear layers, from ['down_proj', 'gate_proj', 'k_proj', 'o_proj', "
    "'q_proj', 'up_proj', 'v_proj']."
  )


def test_bad_flags_are_one_line_errors(capsys):
  for argv, expected in [
    (["--max-num-seqs", "0"], "error: --max-num-seqs: 0 is not valid; expected an integer >= 1."),
    (["--adapter", "runs/a"], "error: --adapter: 'runs/a' is not valid; expected NAME=DIR."),
    (
      ["--prefix-cache-mib", "nan"],
      "error: --prefix-cache-mib: nan is not valid; expected a number of MiB >= 0.",
    ),
    (
      ["--mesh", "rows=2"],
      "error: --mesh: 'rows=2' is not valid; expected AXIS=SIZE pairs, each axis once, from "
      "data, fsdp, tensor, expert (e.g. data=2,tensor=4).",
    ),
    (
      ["--quant", "int3"],
      "error: argument --quant: invalid choice: 'int3' (choose from 'none', 'nf4')",
    ),
  ]:
    with pytest.raises(SystemExit) as exit_:
      serve.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == expected or (expected.endswith(": ") and err.startswith(expected)), err
    assert "\n" not in err


def test_nf4_base_serves_adapters_as_generate_does(served):
  """--quant nf4: the engine over a quantized base equals train.generate on the same base; its
  stack holds q_proj and v_proj only (--lora-targets), so an MLP adapter is refused by name."""
  model, tok, root = served["model"], served["tokenizer"], served["root"]
  quantized = jlora.quantize(served["params"], jlora.QuantConfig(kind="nf4", block_size=32))
  targets = serve.lora_targets("q_proj,v_proj", quantized)
  engine = Engine(
    model, quantized, max_num_seqs=2, max_loras=1, max_lora_rank=8, max_model_len=48,
    lora_targets=targets,
  )  # fmt: skip
  engine.start()
  try:
    with pytest.raises(
      AdapterError, match=r"'mlp' adapts .*\['mlp'\].*--lora-targets q_proj,v_proj"
    ):
      engine.load_adapter("mlp", str(root / "mlp"))
    engine.load_adapter("qv", str(root / "qv"))
    prompt = chat_prompt_ids(tok, PROMPTS[0])
    events, done = [], threading.Event()

    def emit(event):
      events.append(event)
      if event[0] != "token":
        done.set()

    engine.submit(Request(prompt, "qv", 6, emit))
    assert done.wait(timeout=120)
  finally:
    engine.close()
  adapted = jlora.load_adapter(root / "qv", quantized)
  wrapped = jlora.wrap(model.apply)
  ref = generate_ids(model, adapted, [prompt], 6, eos_ids=[tok.eos_token_id], apply_fn=wrapped)[0]
  assert [e[1] for e in events[:-1]] == ref and events[-1][0] == "done"


def test_an_nnx_model_serves_as_train_generate_decodes_it(served, references):
  """--nnx examples.nnx_llama:from_pretrained over the same checkpoint: the engine's greedy
  tokens (a request on an adapter and one on the base, in one batch) equal train.generate's:
  its decoding of the NNX model with the adapter loaded alone, and of jlora's linen Llama."""
  spec, base, root = "examples.nnx_llama:from_pretrained", served["base"], served["root"]
  argv = ["--model", base, "--nnx", spec, "--max-num-seqs", "2", "--max-loras", "1"]
  args = serve.parser().parse_args(argv + ["--max-lora-rank", "8", "--max-model-len", "48"])
  serve.check_args(args)
  engine, server = serve.build(args)
  tok, texts, got, done = (
    server.tokenizer,
    {"qv": PROMPTS[0], "base": PROMPTS[1]},
    {},
    threading.Semaphore(0),
  )
  prompts = {adapter: chat_prompt_ids(tok, text) for adapter, text in texts.items()}

  def emit_to(adapter):
    got[adapter] = []
    return lambda e: got[adapter].append(e[1]) if e[0] == "token" else done.release()

  try:
    engine.load_adapter("qv", str(root / "qv"))
    for adapter, prompt in prompts.items():
      engine.submit(Request(prompt, adapter, 6, emit_to(adapter)))
    assert all(done.acquire(timeout=120) for _ in prompts)
  finally:
    engine.close()
  model, params = engine.model, engine.base_params  # what train.generate --nnx loads
  adapted = jlora.load_adapter(root / "qv", params)
  ref = generate_ids(model, adapted, [prompts["qv"]], 6, eos_ids=[tok.eos_token_id])
  assert got["qv"] == ref[0] == references["qv"][texts["qv"]][:6]
  assert got["base"] == references["base"][texts["base"]][:6]


MESH_SCRIPT = """
import json, sys, threading
from jlora.models import from_pretrained
from train import serve
from train.engine import Engine, Request
from train.generate import chat_prompt_ids

base, root, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
mesh = serve.parse_mesh("data=2,fsdp=2")
model, params, tok = from_pretrained(base, mesh=mesh)
engine = Engine(model, params, max_num_seqs=4, max_loras=2, max_lora_rank=8, max_model_len=64,
                eos_ids=[tok.eos_token_id], mesh=mesh).warm_up().start()
for name in ("qv", "all"):
  engine.load_adapter(name, f"{root}/{name}")
out, done = {}, threading.Semaphore(0)
def request(adapter, prompt):
  out[adapter] = []
  def emit(event):
    if event[0] == "token":
      out[adapter].append(event[1])
    else:
      done.release()
  return Request(chat_prompt_ids(tok, prompt), adapter, 12, emit)
for adapter, prompt in zip(("qv", "all", "base"), prompts):
  engine.submit(request(adapter, prompt))
for _ in range(3):
  assert done.acquire(timeout=120)
engine.close()
shards = {str(x.sharding.spec) for x in (engine.cache["k"], params["model"]["embed_tokens"]["embedding"].value)}
print(json.dumps({"tokens": out, "shards": sorted(shards)}))
"""


def test_a_mesh_of_4_devices_serves_as_one_device_generates(served, references):
  """--mesh data=2,fsdp=2 over 4 fake CPU devices (base weights and slots split): the engine's greedy tokens (three rows on
  two adapters and the base) equal train.generate's on one device."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": root}
  argv = [served["base"], str(served["root"]), json.dumps(PROMPTS)]
  proc = subprocess.run(
    [sys.executable, "-c", MESH_SCRIPT, *argv], env=env, capture_output=True, text=True,
    timeout=300, cwd=root,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  for adapter, prompt in zip(("qv", "all", "base"), PROMPTS):
    assert result["tokens"][adapter] == references[adapter][prompt]
  assert any("data" in spec for spec in result["shards"]), result["shards"]
