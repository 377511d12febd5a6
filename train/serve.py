"""Serve a base model and its LoRA adapters over OpenAI's API, as vLLM serves it.

    python -m train.serve --adapter extract=runs/a --adapter chat=runs/b [--port 8000]

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "extract", "messages": [{"role": "user", "content": "Hi"}]}'

`model` names an adapter or the base (its --model value). Endpoints: GET /v1/models,
POST /v1/completions, POST /v1/chat/completions (streaming with "stream": true), and vLLM's
POST /v1/load_lora_adapter {"lora_name", "lora_path"} and /v1/unload_lora_adapter {"lora_name"}.
Requests run in a continuous batch of --max-num-seqs slots, each with its own adapter
(train/engine.py); loading and unloading adapters never recompiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from fastapi import Request as HttpRequest

from train.engine import AdapterError, Engine, Request
from train.errors import OneLineParser, UserError, exit_on_user_error, naming, verbose_requested
from train.generate import MODEL_ERRORS, named_adapters

MAX_STOP_STRINGS = 4


class ApiError(Exception):
  """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}} with this status."""

  def __init__(self, status: int, message: str, param: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param = status, message, param

  def body(self) -> dict:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(self.status, "InternalServerError")
    return {
      "error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}
    }


# ---------------------------------------------------------------- request parameters


def _number(body: dict, name: str, default, low: float, high: float, *, integer: bool = False):
  value = body.get(name)
  if value is None:
    return default
  kind = int if integer else (int, float)
  ok = isinstance(value, kind) and not isinstance(value, bool)
  if not (ok and math.isfinite(value) and low <= value <= high):
    what = "an integer" if integer else "a number"
    raise ApiError(
      400, f"{name}: {value!r} is not valid; expected {what} in [{low}, {high}].", name
    )
  return value


def _stops(body: dict) -> list[str]:
  stop = body.get("stop")
  stops = [stop] if isinstance(stop, str) else stop or []
  if not (
    isinstance(stops, list)
    and len(stops) <= MAX_STOP_STRINGS
    and all(isinstance(s, str) and s for s in stops)
  ):
    raise ApiError(
      400, f"stop: {stop!r} is not valid; expected a string or up to 4 strings.", "stop"
    )
  return stops


class Sampling:
  """The generation parameters of one request body, checked (a bad one is a 400 naming it)."""

  def __init__(self, body: dict, default_max_tokens: int | None):
    if body.get("n", 1) != 1:
      raise ApiError(400, f"n: {body['n']!r} is not supported; only n=1.", "n")
    if not isinstance(body.get("stream", False), bool):
      raise ApiError(400, f"stream: {body['stream']!r} is not valid; expected true or false.")
    self.stream = body.get("stream", False)
    self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    self.max_tokens = _number(
      {"max_tokens": limit}, "max_tokens", default_max_tokens, 1, 2**31 - 1, integer=True
    )
    self.temperature = float(_number(body, "temperature", 1.0, 0.0, 1e6))
    self.top_p = float(_number(body, "top_p", 1.0, 1e-9, 1.0))
    self.seed = _number(body, "seed", None, -(2**63), 2**64 - 1, integer=True)
    self.seed = secrets.randbits(32) if self.seed is None else self.seed % 2**32
    self.stops = _stops(body)


# ---------------------------------------------------------------- tokens to text


class Detokenizer:
  """Text so far of a growing token list; `push` returns the new text safe to send (a trailing
  partial UTF-8 character or a possible start of a stop string is held back until it resolves)."""

  def __init__(self, tokenizer, stops: Sequence[str]):
    self.tokenizer, self.stops = tokenizer, list(stops)
    self.ids: list[int] = []
    self.sent = ""
    self.stopped = False

  def text(self) -> str:
    text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
    cuts = [text.find(s) for s in self.stops if s in text]
    if cuts:
      self.stopped = True
      return text[: min(cuts)]
    return text

  def push(self, token: int | None) -> str:
    """token None: the end; flush everything."""
    if token is not None:
      self.ids.append(token)
    text = self.text()
    ready = len(text)
    if token is not None and not self.stopped:
      hold = max((len(s) - 1 for s in self.stops), default=0)
      ready = len(text.rstrip("\ufffd")) - hold
    if ready <= len(self.sent) or not text.startswith(self.sent):
      return ""
    new, self.sent = text[len(self.sent) : ready], text[:ready]
    return new


# ---------------------------------------------------------------- the app


class Server:
  """The HTTP side: checks requests, hands them to the engine, turns tokens into responses."""

  def __init__(self, engine: Engine, tokenizer, base_name: str):
    self.engine, self.tokenizer, self.base_name = engine, tokenizer, base_name
    self.created = int(time.time())

  def models(self) -> dict:
    card = lambda name, root, parent: {  # noqa: E731
      "id": name,
      "object": "model",
      "created": self.created,
      "owned_by": "jlora",
      "root": root,
      "parent": parent,
      "max_model_len": self.engine.max_model_len,
    }
    adapters = [card(n, path, self.base_name) for n, path in self.engine.loaded().items()]
    return {"object": "list", "data": [card(self.base_name, self.base_name, None), *adapters]}

  def adapter_of(self, body: dict) -> str:
    name = body.get("model")
    if name == self.base_name:
      return "base"
    if not isinstance(name, str) or name not in self.engine.loaded():
      raise ApiError(404, f"The model {name!r} does not exist.", "model")
    return name

  def prompt_ids(self, body: dict, chat: bool) -> list[int]:
    if chat:
      messages = body.get("messages")
      if not (isinstance(messages, list) and messages and all(_is_message(m) for m in messages)):
        raise ApiError(
          400, "messages: expected a non-empty list of {role, content} objects.", "messages"
        )
      from train.data import render_chat

      text = render_chat(self.tokenizer, messages, True)
      return self.tokenizer.encode(text, add_special_tokens=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
      prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
      return prompt
    if not (isinstance(prompt, str) and prompt):
      raise ApiError(
        400, "prompt: expected a non-empty string (or one list of token ids).", "prompt"
      )
    return self.tokenizer.encode(prompt)

  def start(self, body: dict, chat: bool) -> tuple[Request, Sampling, asyncio.Queue]:
    """Checks the body and submits it; returns the request and the queue its events arrive on."""
    adapter = self.adapter_of(body)
    prompt = self.prompt_ids(body, chat)
    context = self.engine.max_model_len
    sampling = Sampling(body, None if chat else 16)
    max_tokens = sampling.max_tokens or context - len(prompt)
    if len(prompt) + max_tokens > context or max_tokens < 1:
      raise ApiError(
        400,
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} in the "
        "completion). Please reduce the length of the prompt or the completion.",
        "messages" if chat else "prompt",
      )
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)  # noqa: E731
    request = Request(
      prompt, adapter, max_tokens, emit, sampling.temperature, sampling.top_p, sampling.seed
    )
    self.engine.submit(request)
    return request, sampling, events

  async def pieces(self, request, sampling, events, is_gone) -> AsyncIterator[tuple]:
    """("text", piece) as tokens arrive, then ("done", finish_reason, completion_tokens)."""
    text = Detokenizer(self.tokenizer, sampling.stops)
    try:
      while True:
        try:
          event = await asyncio.wait_for(events.get(), timeout=1.0)
        except asyncio.TimeoutError:
          if await is_gone():
            return
          continue
        if event[0] == "error":
          raise ApiError(event[1], event[2])
        if event[0] == "done":
          yield "text", text.push(None)
          yield "done", event[1], len(text.ids)
          return
        piece = text.push(event[1])
        if piece:
          yield "text", piece
        if text.stopped:
          yield "text", text.push(None)
          yield "done", "stop", len(text.ids)
          return
    finally:
      request.cancelled.set()  # a no-op once finished; frees the slot of a gone client


def _is_message(m) -> bool:
  return (
    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
  )


def _usage(prompt: int, completion: int) -> dict:
  return {
    "prompt_tokens": prompt,
    "completion_tokens": completion,
    "total_tokens": prompt + completion,
  }


def _choice(chat: bool, text: str | None, finish: str | None, streamed: bool) -> dict:
  if not chat:
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
  if streamed:
    delta = {} if text is None else {"content": text}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
  message = {"role": "assistant", "content": text}
  return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}


def create_app(server: Server):
  """The FastAPI app: OpenAI's routes over `server`.

  Long because each route is a few lines over the closures they share (the error shape, the body
  reader, the completion loop); split apart they would pass those around instead.
  """
  from fastapi import FastAPI
  from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

  app = FastAPI(title="jlora serve")

  @app.exception_handler(ApiError)
  async def api_error(_, e: ApiError):
    return JSONResponse(e.body(), status_code=e.status)

  async def json_body(http: HttpRequest) -> dict:
    try:
      body = json.loads(await http.body())
    except ValueError as e:
      raise ApiError(400, f"The request body is not valid JSON: {e}.") from e
    if not isinstance(body, dict):
      raise ApiError(400, "The request body must be a JSON object.")
    return body

  @app.get("/v1/models")
  async def models():
    return server.models()

  async def complete(http: HttpRequest, chat: bool):
    body = await json_body(http)
    request, sampling, events = server.start(body, chat)
    kind = "chat.completion" if chat else "text_completion"
    head = {
      "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
      "created": int(time.time()),
    }
    head["model"] = body["model"]
    prompt_tokens = len(request.prompt)
    pieces = server.pieces(request, sampling, events, http.is_disconnected)
    if not sampling.stream:
      text, finish, count = [], None, 0
      async for event in pieces:
        if event[0] == "text":
          text.append(event[1])
        else:
          finish, count = event[1], event[2]
      choice = _choice(chat, "".join(text), finish, False)
      usage = _usage(prompt_tokens, count)
      return {**head, "object": kind, "choices": [choice], "usage": usage}

    async def sse():
      chunk = {**head, "object": f"{kind}.chunk" if chat else kind}
      send = lambda **extra: f"data: {json.dumps({**chunk, **extra})}\n\n"  # noqa: E731
      if chat:
        first = _choice(chat, "", None, True)
        first["delta"]["role"] = "assistant"
        yield send(choices=[first])
      try:
        async for event in pieces:
          if event[0] == "text" and event[1]:
            yield send(choices=[_choice(chat, event[1], None, True)])
          elif event[0] == "done":
            yield send(choices=[_choice(chat, None if chat else "", event[1], True)])
            if sampling.include_usage:
              yield send(choices=[], usage=_usage(prompt_tokens, event[2]))
      except ApiError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
      yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")

  @app.post("/v1/completions")
  async def completions(http: HttpRequest):
    return await complete(http, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(http: HttpRequest):
    return await complete(http, chat=True)

  async def adapter_call(http: HttpRequest, fields: Sequence[str], call):
    body = await json_body(http)
    for field in fields:
      if not isinstance(body.get(field), str) or not body[field]:
        raise ApiError(400, f"{field}: expected a non-empty string.", field)
    try:
      await asyncio.to_thread(call, *(body[f] for f in fields))
    except AdapterError as e:
      raise ApiError(e.status, str(e), fields[0]) from e
    return f"Success: LoRA adapter '{body['lora_name']}' {call.__name__.split('_')[0]}ed."

  @app.post("/v1/load_lora_adapter")
  async def load_lora_adapter(http: HttpRequest):
    message = await adapter_call(http, ("lora_name", "lora_path"), server.engine.load_adapter)
    return PlainTextResponse(message)

  @app.post("/v1/unload_lora_adapter")
  async def unload_lora_adapter(http: HttpRequest):
    message = await adapter_call(http, ("lora_name",), server.engine.unload_adapter)
    return PlainTextResponse(message)

  return app


# ---------------------------------------------------------------- the command line


def parser():
  from jlora.models import DEFAULT_MODEL

  cli = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add = cli.add_argument
  add("--model", default=DEFAULT_MODEL, help="HF dir, .gguf file, hub id or embedded name")
  add(
    "--nnx",
    help="package.module:factory building an NNX model from --model (as train.sft's "
    "config.model.nnx): serve it instead of jlora's own family",
  )
  add("--adapter", action="append", default=[], help="NAME=DIR, a PEFT adapter dir; repeatable")
  add("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
  add("--port", type=int, default=8000)
  add("--max-num-seqs", type=int, default=8, help="sequence slots in the running batch")
  add("--max-loras", type=int, default=4, help="adapters loaded at once")
  add("--max-lora-rank", type=int, default=16, help="largest adapter rank (smaller are padded)")
  add(
    "--lora-targets",
    default="all-linear",
    help="the linear layers adapters may adapt: all-linear, or comma-separated module names "
    "(e.g. q_proj,k_proj,v_proj,o_proj); every step computes each one, so fewer cost less",
  )
  add(
    "--max-model-len",
    type=int,
    help="tokens per sequence, prompt included (default: the model's context, at most 2048)",
  )
  add(
    "--prefix-cache-mib",
    type=float,
    default=256,
    help="memory for the keys/values of prompt prefixes, per adapter, so that a prompt starting "
    "like an earlier one (a system prompt) prefills only the rest (0: off; default 256)",
  )
  add("--quant", choices=["none", "nf4"], default="none", help="quantize the base to 4 bits")
  add(
    "--mesh",
    help="devices as AXIS=SIZE pairs over data, fsdp, tensor, expert (e.g. data=2,tensor=4; -1 "
    "takes the rest): the base is sharded as train.sft shards it, the slots split over the "
    "batch axes (default: one device)",
  )
  add("--served-model-name", help="the base model's name in the API (default: --model)")
  add("--verbose", action="store_true", help="show the full traceback of an error")
  return cli


def check_args(args) -> None:
  for flag in ("max_num_seqs", "max_loras", "max_lora_rank", "max_model_len"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      raise UserError(
        f"--{flag.replace('_', '-')}: {value!r} is not valid; expected an integer >= 1."
      )
  if not (math.isfinite(args.prefix_cache_mib) and args.prefix_cache_mib >= 0):  # nan, inf too
    raise UserError(
      f"--prefix-cache-mib: {args.prefix_cache_mib!r} is not valid; expected a number of MiB >= 0."
    )
  if not 0 <= args.port < 65536:
    raise UserError(f"--port: {args.port!r} is not valid; expected 0..65535.")
  args.named = named_adapters(args.adapter) if args.adapter else {}
  if args.adapter and not args.named:
    raise UserError(f"--adapter: {args.adapter[0]!r} is not valid; expected NAME=DIR.")
  if len(args.named) > args.max_loras:
    raise UserError(
      f"--adapter: {len(args.named)} adapters given, over --max-loras {args.max_loras}."
    )


def parse_mesh(value: str | None):
  """--mesh AXIS=SIZE,... as a jlora.sharding.make_mesh mesh (None: no mesh)."""
  if value is None:
    return None
  from jlora.sharding import MESH_AXES, make_mesh

  sizes = {}
  for pair in value.split(","):
    axis, _, size = pair.partition("=")
    if axis not in MESH_AXES or axis in sizes or not size.lstrip("-").isdigit():
      raise UserError(
        f"--mesh: {value!r} is not valid; expected AXIS=SIZE pairs, each axis once, from "
        f"{', '.join(MESH_AXES)} (e.g. data=2,tensor=4)."
      )
    sizes[axis] = int(size)
  with naming(f"--mesh {value!r}", (ValueError,)):
    return make_mesh(**sizes)


def lora_targets(value: str, params, layout=None):
  """--lora-targets as LoraConfig.targets: names that match some of the model's linear layers
  (those all-linear adapts) and nothing else."""
  from jlora.config import check_targets, select

  if value == "all-linear":
    return value
  targets = [t.strip() for t in value.split(",")]
  linear = select(params, "all-linear", layout=layout)
  try:
    check_targets("--lora-targets", targets)
    fits = set(select(params, targets)) <= set(linear)
  except ValueError:  # a malformed list, or names matching no weight
    fits = False
  if not fits:
    raise UserError(
      f"--lora-targets: {value!r} is not valid; expected all-linear or comma-separated names "
      f"of the model's linear layers, from {sorted({path.rpartition('/')[2] for path in linear})}."
    )
  return targets


def build(args, prompt_lengths: Sequence[int] = ()) -> tuple[Engine, Server]:
  """Loads the model (quantized with --quant), starts the engine and loads the --adapter dirs.
  prompt_lengths: prompts whose prefill (every batch size) compiles before serving."""
  import jlora
  from jlora.models import from_pretrained
  from jlora.models.nnx_causal import weight_layout

  mesh = parse_mesh(args.mesh)
  if args.nnx:  # an NNX model built by the user's factory, the same seam as train.sft's
    from train import nnx_model

    flags = f"--nnx {args.nnx!r}", f"--model {args.model!r}"
    model, params, tokenizer = nnx_model.load(args.nnx, args.model, *flags, mesh=mesh)
  else:
    with naming(f"--model {args.model!r}", MODEL_ERRORS):
      model, params, tokenizer = from_pretrained(args.model, mesh=mesh)
  # An NNX model without a registered family declares no context length.
  context = getattr(model.config, "max_position_embeddings", 2048)
  max_len = args.max_model_len or min(context, 2048)
  if max_len > context:
    raise UserError(
      f"--max-model-len: {max_len} is not valid; expected at most the model's context, {context}."
    )
  if args.quant == "nf4":
    params = jlora.quantize(params, jlora.QuantConfig(kind="nf4"), layout=weight_layout(model))
  eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
  engine = Engine(
    model,
    params,
    max_num_seqs=args.max_num_seqs,
    max_loras=args.max_loras,
    max_lora_rank=args.max_lora_rank,
    max_model_len=max_len,
    eos_ids=eos,
    mesh=mesh,
    lora_targets=lora_targets(args.lora_targets, params, weight_layout(model)),
    prefix_cache_mib=args.prefix_cache_mib,
  )
  engine.warm_up(prompt_lengths).start()
  for name, path in args.named.items():
    try:
      engine.load_adapter(name, path)
    except AdapterError as e:
      engine.close()
      raise UserError(f"--adapter {name}={path}: {e}") from e
  return engine, Server(engine, tokenizer, args.served_model_name or args.model)


def serve_in_thread(server: Server, host: str = "127.0.0.1", timeout: float = 60.0):
  """(url, stop): the app on a free port of `host`, run by uvicorn in a daemon thread (tests,
  benchmarks). `stop()` shuts the web server and the engine down."""
  import socket
  import threading

  import uvicorn

  sock = socket.socket()
  sock.bind((host, 0))
  web = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning"))
  thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.time() + timeout
  while not web.started:
    if time.time() > deadline or not thread.is_alive():
      raise RuntimeError(f"the server did not start within {timeout:g} s")
    time.sleep(0.05)

  def stop():
    web.should_exit = True
    thread.join(timeout=30)
    server.engine.close()

  return f"http://{host}:{sock.getsockname()[1]}", stop


def main(argv: Sequence[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  with exit_on_user_error(verbose_requested(argv)):
    args = parser().parse_args(argv)
    check_args(args)
    engine, server = build(args)
  import uvicorn

  names = [server.base_name, *engine.loaded()]
  print(f"serving {names} on http://{args.host}:{args.port}/v1", flush=True)
  try:
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
  finally:
    engine.close()


if __name__ == "__main__":
  main()
