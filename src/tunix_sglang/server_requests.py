"""Request bodies of the rollout server, checked to what its engine can take.

Two layers: the models below refuse wrong types (no bool or float where an integer belongs,
strict JSON types), NaN and Infinity, unknown fields and values no engine takes; then
`check_generate` holds a request against this server's own limits (vocabulary, prompt and
generation lengths, batch) before anything reaches the scheduler thread.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field

from tunix_sglang.weights_wire import MAX_INT64

Version = Annotated[int, Field(ge=0, le=MAX_INT64)]
MAX_STOP_TOKENS = 64
MAX_TEMPERATURE = 1e4
MAX_PATH_CHARS = 4096

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class GenerateRequest(BaseModel):
    model_config = _STRICT
    prompts: list[list[int]] = Field(min_length=1, description="token ids, one list each")
    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="-1, 0 or None: off; else <= vocab")
    seed: int | None = Field(None, ge=0, lt=2**31, description="restart sampling stream")
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKENS)
    ignore_eos: bool = False
    expected_version: Version | None = Field(None, description="409 unless the server has it")


class SampleOut(BaseModel):
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str


class GenerateResponse(BaseModel):
    weight_version: int
    seconds: float
    samples: list[SampleOut]


class ProbeRequest(BaseModel):
    """The sync proof's forced scoring: one new token after each prompt (tunix_sglang.probe)."""

    model_config = _STRICT
    prompts: list[list[int]] = Field(min_length=1, description="token ids, one list each")
    expected_version: Version | None = Field(None, description="409 unless the server has it")


class BeginUpload(BaseModel):
    model_config = _STRICT
    version: Version
    manifest: dict[str, Any]


class LoadRequest(BaseModel):
    model_config = _STRICT
    path: str = Field(min_length=1, max_length=MAX_PATH_CHARS,
                      description="a .safetensors file or model directory under --weights-root")
    version: Version


@dataclasses.dataclass(frozen=True)
class Limits:
    """What this server's engine takes (set at start from its model and flags)."""

    vocab_size: int
    max_prompt_len: int
    max_new_tokens: int
    max_prompts: int


def http_error(code: int, detail: str) -> HTTPException:
    return HTTPException(status_code=code, detail=detail)


def check_prompts(prompts: list[list[int]], lim: Limits) -> None:
    """HTTPException (413/422) for prompts this server cannot take (count, length, ids)."""
    top = lim.vocab_size - 1
    if len(prompts) > lim.max_prompts:
        raise http_error(413, f"{len(prompts)} prompts in one request; at most "
                         f"{lim.max_prompts}")
    for i, p in enumerate(prompts):
        if not 1 <= len(p) <= lim.max_prompt_len:
            raise http_error(422, f"prompt {i} has {len(p)} tokens; allowed 1..{lim.max_prompt_len}"
                        " (--max-prompt-length)")
        if min(p) < 0 or max(p) > top:
            raise http_error(422, f"prompt {i} has token ids outside 0..{top}")


def check_generate(req: GenerateRequest, lim: Limits) -> None:
    """HTTPException (413/422) naming the first field this server cannot take."""
    top = lim.vocab_size - 1
    check_prompts(req.prompts, lim)
    if req.max_new_tokens > lim.max_new_tokens:
        raise http_error(422, f"max_new_tokens {req.max_new_tokens} > this server's "
                    f"--max-new-tokens {lim.max_new_tokens}")
    if req.stop_token_ids and (min(req.stop_token_ids) < 0 or max(req.stop_token_ids) > top):
        raise http_error(422, f"stop_token_ids outside 0..{top}")
    if req.top_k is not None and req.top_k > lim.vocab_size:
        raise http_error(422, f"top_k {req.top_k} > the vocabulary size {lim.vocab_size}")
