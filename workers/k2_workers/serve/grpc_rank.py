"""The generation service on rank 0 of a group, as methods over its engine.

A request is decoded exactly as an HTTP one (`GroupEngine.stream`, greedy or seeded sampling, `CompletionText` for
the text and stop sequences), so unary, streamed and HTTP outputs agree. The client's deadline becomes the request's
(the shorter of it and `--request-timeout-s`), and a client that cancels or runs past its deadline takes its request
out of the queue or of its batch, as `Abort` does by request id.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Generator, Iterator
from typing import NoReturn

import grpc

from k2_workers.serve.engine import GroupBroken, GroupEngine
from k2_workers.serve.grpc_api import time_left_s
from k2_workers.serve.openai_request import MAX_STOP_SEQUENCES, MAX_TEMPERATURE
from k2_workers.serve.openai_response import CompletionText
from k2_workers.serve.proto import generation_pb2 as pb
from k2_workers.serve.request import DEFAULT_MAX_NEW_TOKENS, GenerateParams, RequestError
from k2_workers.serve.scheduler import Cancelled, DeadlineExceeded, QueueFull, Stopping
from k2_workers.serve.token_stream import TokenStream

MAX_REQUEST_ID_CHARS = 256
MAX_TOP_K = 1_000_000
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


def parse_request(
    request: pb.GenerateRequest, encode: Callable[[str], list[int]], vocab_size: int, max_new_tokens_limit: int
) -> tuple[list[int], GenerateParams, tuple[str, ...]]:
    """(prompt ids, parameters, stop sequences) of a request; a RequestError naming the field when it is bad."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError(f"request_id: at most {MAX_REQUEST_ID_CHARS} characters")
    which = request.WhichOneof("prompt")
    if which is None:
        raise RequestError("prompt: set text or token_ids")
    if which == "text":
        if not request.text:
            raise RequestError("text: a non-empty string")
        prompt_ids = encode(request.text)
    else:
        prompt_ids = list(request.token_ids.ids)
        if not prompt_ids or max(prompt_ids) >= vocab_size:
            raise RequestError(f"token_ids.ids: at least one id, each below the vocabulary size {vocab_size}")
    s = request.sampling
    max_new = s.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if max_new > max_new_tokens_limit:
        raise RequestError(f"sampling.max_new_tokens: an integer in [1, {max_new_tokens_limit}] (0: the default)")
    if not math.isfinite(s.temperature) or not 0 <= s.temperature <= MAX_TEMPERATURE:
        raise RequestError(f"sampling.temperature: a number in [0, {MAX_TEMPERATURE}]")
    if not math.isfinite(s.top_p) or not 0 <= s.top_p <= 1:
        raise RequestError("sampling.top_p: a number in [0, 1] (0 or 1: off)")
    if s.top_k > MAX_TOP_K:
        raise RequestError(f"sampling.top_k: an integer in [0, {MAX_TOP_K}] (0: off)")
    if len(s.stop) > MAX_STOP_SEQUENCES or not all(s.stop):
        raise RequestError(f"sampling.stop: up to {MAX_STOP_SEQUENCES} non-empty strings")
    top_p = None if s.top_p in (0, 1) else s.top_p
    params = GenerateParams(max_new, float(s.temperature), s.seed, s.top_k or None, top_p)
    return prompt_ids, params, tuple(s.stop)


class RankGeneration:
    """`grpc_api.Generation` over rank 0's engine."""

    def __init__(self, engine: GroupEngine, max_new_tokens_limit: int, model: str, group: str) -> None:
        self.engine = engine
        self.max_new_tokens_limit = max_new_tokens_limit
        self.model = model
        self.group = group
        self._in_flight: dict[str, TokenStream] = {}  # by request_id, for Abort
        self._lock = threading.Lock()

    def generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        stream, prompt_tokens, text = self._start(request, context)
        tokens = []
        with contextlib.closing(self._tokens(request, stream, context)) as decoded:
            for token in decoded:
                tokens.append(token)
                text.push(token)
                if text.done:
                    break
        text.rest()
        output = text.output()
        return pb.GenerateResponse(
            text=output.text,
            token_ids=tokens,
            finish_reason=FINISH_REASONS[output.finish_reason],
            usage=pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=output.completion_tokens),
            placement_generation=stream.placement_generation,
            batch_size=stream.batch_size,
        )

    def generate_stream(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        stream, prompt_tokens, text = self._start(request, context)
        with contextlib.closing(self._tokens(request, stream, context)) as decoded:
            for token in decoded:
                yield pb.GenerateStreamResponse(text=text.push(token), token_ids=[token])
                if text.done:
                    break
        rest = text.rest()
        output = text.output()
        usage = pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=output.completion_tokens)
        yield pb.GenerateStreamResponse(text=rest, finish_reason=FINISH_REASONS[output.finish_reason], usage=usage)

    def abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        with self._lock:
            stream = self._in_flight.get(request.request_id)
        if stream is not None:
            stream.cancel()
        return pb.AbortResponse(found=stream is not None)

    def model_info(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        config = self.engine.model.config
        return pb.ModelInfo(
            model=self.model,
            vocab_size=config.vocab_size,
            max_position_embeddings=config.max_position_embeddings,
            max_new_tokens_limit=self.max_new_tokens_limit,
            max_prompt_tokens=self.engine.max_prompt_tokens,
            eos_token_id=self.engine.tokenizer.eos_id,
            ranks_per_group=self.engine.world_size,
        )

    def load(self, request: pb.LoadRequest, context: grpc.ServicerContext) -> pb.LoadResponse:
        scheduler, generation = self.engine.scheduler, self.engine.generation
        group = pb.GroupLoad(
            group=self.group,
            ready=self.engine.unready is None,
            queued=scheduler.queued,
            decoding=scheduler.in_batch,
            max_queue=scheduler.max_queue,
            max_batch_size=scheduler.max_batch_size,
            placement_generation=-1 if generation is None else generation,
        )
        return pb.LoadResponse(groups=[group])

    def _start(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> tuple[TokenStream, int, CompletionText]:
        """The request's stream, queued; its refusals as gRPC errors."""
        tokenizer, vocab = self.engine.tokenizer, self.engine.model.config.vocab_size
        try:
            prompt_ids, params, stops = parse_request(request, tokenizer.encode, vocab, self.max_new_tokens_limit)
        except ValueError as error:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if (reason := self.engine.unready) is not None:
            abort(context, grpc.StatusCode.UNAVAILABLE, reason)
        try:
            stream = self.engine.stream(
                prompt_ids, params, lambda: not context.is_active(), timeout_s=time_left_s(context)
            )
        except Exception as error:
            abort_for(context, error)
        if request.request_id:
            with self._lock:
                if request.request_id in self._in_flight:
                    stream.cancel()
                    abort(context, grpc.StatusCode.ALREADY_EXISTS, f"request_id: {request.request_id!r} is in flight")
                self._in_flight[request.request_id] = stream
        return stream, len(prompt_ids), CompletionText(tokenizer.decode, tokenizer.eos_id, stops)

    def _tokens(
        self, request: pb.GenerateRequest, stream: TokenStream, context: grpc.ServicerContext
    ) -> Generator[int, None, None]:
        """The stream's tokens; its failures as gRPC errors, an aborted request CANCELLED."""
        try:
            yield from stream
        except Exception as error:
            abort_for(context, error)
        finally:
            if request.request_id:
                with self._lock:
                    if self._in_flight.get(request.request_id) is stream:
                        del self._in_flight[request.request_id]
        if not stream.wanted:
            abort(context, grpc.StatusCode.CANCELLED, f"request_id: {request.request_id!r} was aborted")


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("context.abort returns only by raising")


def abort_for(context: grpc.ServicerContext, error: Exception) -> NoReturn:
    """End the RPC with the status that answers `error` (re-raised when it is none we know: INTERNAL)."""
    if isinstance(error, ValueError):
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, QueueFull):
        abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    if isinstance(error, DeadlineExceeded):
        abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, str(error))
    if isinstance(error, Cancelled):
        abort(context, grpc.StatusCode.CANCELLED, str(error))
    if isinstance(error, Stopping):
        abort(context, grpc.StatusCode.UNAVAILABLE, str(error))
    if isinstance(error, RuntimeError) and isinstance(error.__cause__, GroupBroken):  # its group broke: no answer
        abort(context, grpc.StatusCode.UNAVAILABLE, str(error.__cause__))
    raise error
