"""The lm-eval client hydrabench scores a vLLM server with: lm-eval's `local-completions`,
asking the server only for what lm-eval uses, in a few large requests.

Where the time went (tiny model, 2 cores, measured; benchmarks/README.md): not HTTP round trips nor
tokenisation (requests go pre-tokenized), but vLLM's per-token work around prompt logprobs.
lm-eval's loglikelihood request (`echo` + `logprobs=1`) makes vLLM detokenize every prompt
position and its top-1 alternative and return both twice (the OpenAI logprobs block and the raw
prompt_logprobs); and the hf batch size (8-32 prompts a request, 4 in flight) made many small
engine steps that fought the server's own processes for 2 cores. `prompt_logprobs: 0` returns
each prompt token's own logprob and rank, nothing else: the same numbers, bit for bit, for half
the API server's CPU time.
"""

from __future__ import annotations

import math
from operator import itemgetter
from pathlib import Path
from typing import Any

from lm_eval.models.openai_completions import LocalCompletionsAPI

from hydrabench.evaluation.harness import TaskScore, run_lm_eval
from hydrabench.serving.server import VllmServer

# Requests in flight: one being computed while the server formats the other's answer.
CONCURRENT_REQUESTS = 2
# Prompts a request carries at most; a run's requests are otherwise split evenly over the two.
MAX_PROMPTS_PER_REQUEST = 256
# Seconds one request may take (lm-eval's default, 300, is short for 256 generations on a CPU).
REQUEST_TIMEOUT_S = 3600


class ServedLM(LocalCompletionsAPI):
    """`local-completions` whose loglikelihood requests ask vLLM for `prompt_logprobs: 0` only.

    Scores equal lm-eval's own client's (the same logprobs, summed in the same order) but for
    is_greedy at an exact float tie: vLLM's rank counts the tokens whose logprob is >= the
    scored one's, so a tie is not greedy here, greedy in lm-eval's echo client and greedy in hf
    only for the lower token id. Generation requests are lm-eval's own.
    """

    def _create_payload(self, messages: Any, generate: bool = False,
                        gen_kwargs: dict | None = None, seed: int = 1234, eos: str | None = None,
                        **kwargs: Any) -> dict:
        if generate:
            return super()._create_payload(messages, generate=True, gen_kwargs=gen_kwargs,
                                           seed=seed, eos=eos, **kwargs)
        return {"model": self.model, "prompt": messages, "temperature": 0, "max_tokens": 1,
                "prompt_logprobs": 0, "seed": seed}

    @staticmethod
    def parse_logprobs(outputs: dict | list[dict], tokens: list[list[int]] | None = None,
                       ctxlens: list[int] | None = None, **kwargs: Any
                       ) -> list[tuple[float, bool]]:
        """(sum of the continuation's logprobs, every continuation token ranked first)."""
        results = []
        for output in outputs if isinstance(outputs, list) else [outputs]:
            choices = sorted(output["choices"], key=itemgetter("index"))
            for choice, prompt, ctxlen in zip(choices, tokens, ctxlens, strict=True):
                # Position 0 has no logprob (None); each later entry is {token id: {logprob, rank}}.
                entries = [choice["prompt_logprobs"][pos][str(prompt[pos])]
                           for pos in range(ctxlen, len(prompt))]
                results.append((sum(e["logprob"] for e in entries),
                                all(e["rank"] == 1 for e in entries)))
        return results

    async def get_batched_requests(self, requests: list, cache_keys: list, **kwargs: Any
                                   ) -> list:
        # Few, large requests: split evenly over the requests in flight, capped.
        self._batch_size = max(1, min(MAX_PROMPTS_PER_REQUEST,
                                      math.ceil(len(requests) / self._concurrent)))
        return await super().get_batched_requests(requests, cache_keys, **kwargs)


def served_lm(server: VllmServer, model_dir: str | Path,
              model_name: str | None = None) -> ServedLM:
    """The lm-eval model that scores `model_dir` (its tokenizer) as `server` serves it, with
    the hf backend's scores; `model_name`: an adapter the server loaded (default: its model).

    Requests go pre-tokenized with the model's own tokenizer and lm-eval adds the BOS itself:
    with `tokenized_requests=False` the server adds a BOS while lm-eval cuts the continuation one
    token early, and every loglikelihood is off by nats. `max_length` is the server's
    max_model_len (lm-eval assumes 2048 otherwise).
    """
    return ServedLM(model=model_name or server.model_name, base_url=server.completions_url,
                    tokenizer_backend="huggingface", tokenizer=str(model_dir),
                    num_concurrent=CONCURRENT_REQUESTS, max_retries=2,
                    timeout=REQUEST_TIMEOUT_S, tokenized_requests=True, add_bos_token=True,
                    max_length=server.max_model_len)


def evaluate_served(server: VllmServer, model_dir: Path, tasks: list[str], *,
                    limit: int | None, seed: int, allow_code_execution: bool = False,
                    num_fewshot: int | None = None, output_dir: Path | None = None,
                    gen_kwargs: str | None = None,
                    model_name: str | None = None) -> dict[str, TaskScore]:
    """Score the checkpoint in `model_dir` (its tokenizer), served by `server`, with lm-eval's
    local-completions; `model_name`: a LoRA adapter the server loaded (default: its model).

    Its per-answer loglikelihoods and greedy generations match the hf backend's on the same
    checkpoint (see `served_lm`); the server takes the requests in a few large batches.
    """
    try:
        return run_lm_eval(served_lm(server, model_dir, model_name), tasks,
                           batch_size=None, limit=limit, seed=seed,
                           allow_code_execution=allow_code_execution, num_fewshot=num_fewshot,
                           output_dir=output_dir, gen_kwargs=gen_kwargs)
    except Exception:
        server.raise_if_dead()  # the cause is in the server's log, not in lm-eval's retries
        raise
