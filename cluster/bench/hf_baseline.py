"""The Hugging Face transformers baseline for `pdserve bench engine`, on the same weights and workload.

Which transformers API runs it (the JSON's `baseline.api` says which was used):
- `generate_batch`: transformers' continuous batching (`model.generate_batch`, paged KV cache) when every
  request has the same output length (that API takes one `max_new_tokens` for the whole batch). A first
  call on the warm-up prompts (one as long as the longest) keeps the manager (`persistent_manager=True`),
  so the timed call reuses the allocated cache and captured graphs, like our engine, whose construction is
  not timed either.
- `continuous_batching_manager`: the same continuous-batching manager that `generate_batch` wraps, fed with
  `add_request(..., max_new_tokens=n)` per request, when output lengths differ.
- `padded_generate`: plain `model.generate` over left-padded batches of `max_num_seqs` requests (sorted by
  length); the fallback when continuous batching fails (its error is kept in `baseline.fallback_reason`).
EOS never stops a request (eos_token_id=-1 / min_new_tokens), mirroring `ignore_eos=True` in ours.
Throughput uses `wall_s`: for continuous batching, the span from the first request's creation to the last
one's end as transformers stamps them (its manager thread start/stop and the `gc.collect` on stop, ~0.5 s
a call, are left out, as our engine's construction is); `call_s` is the whole timed call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from cluster.bench.report import DeviceTimer


@dataclass(frozen=True)
class BaselineSettings:
    """Knobs of the transformers run; None lets transformers decide (its GPU-memory-based defaults)."""

    max_num_seqs: int = 256
    num_blocks: int | None = None
    max_batch_tokens: int | None = None
    block_size: int = 256
    attn_implementation: str | None = None
    api: str = "auto"  # auto | continuous | padded


def _gen_config(temperature: float, max_new_tokens: int) -> Any:
    from transformers import GenerationConfig

    sample = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
        else {"do_sample": False}
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=-1, pad_token_id=0, **sample)


def _cb_config(settings: BaselineSettings, prompts: list[list[int]], out_lens: list[int], seed: int,
               device: str) -> Any:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    num_blocks, max_batch_tokens = settings.num_blocks, settings.max_batch_tokens
    if not device.startswith("cuda"):  # transformers sizes the cache from GPU memory; size it to the workload
        bs = settings.block_size
        num_blocks = num_blocks or sum(math.ceil((len(p) + o) / bs) + 1 for p, o in zip(prompts, out_lens,
                                                                                         strict=True)) + 8
        max_batch_tokens = max_batch_tokens or 2048
    return ContinuousBatchingConfig(block_size=settings.block_size, num_blocks=num_blocks,
                                    max_batch_tokens=max_batch_tokens, seed=seed,
                                    max_requests_per_batch=min(settings.max_num_seqs, len(prompts)))


@dataclass
class Timed:
    """Output-token count per request (in input order) and seconds: `wall_s` is the generation span (first
    request added -> last finished, from transformers' own per-request stamps where it has them), `call_s`
    the whole timed call including the manager's thread start/stop."""

    counts: list[int]
    wall_s: float
    call_s: float
    cb_config: dict[str, Any] | None = None


def _span(outputs: list[Any]) -> float:
    return max(o.lifespan[1] for o in outputs) - min(o.created_time for o in outputs)


def _cb_dict(cb: Any) -> dict[str, Any]:
    keys = ("block_size", "num_blocks", "max_batch_tokens", "max_requests_per_batch")
    return {k: getattr(cb, k) for k in keys}


def _generate_batch(model: Any, prompts: list[list[int]], out_lens: list[int], warm: list[list[int]],
                    temperature: float, seed: int, settings: BaselineSettings, timer: DeviceTimer,
                    device: str) -> Timed:
    gc, cb = _gen_config(temperature, out_lens[0]), _cb_config(settings, prompts, out_lens, seed, device)
    if max(map(len, warm)) < max(map(len, prompts)):
        raise ValueError("the warm-up prompts must include one as long as the longest timed prompt")
    try:  # the warm-up call sizes the kept manager (longest prompt, output length), so it must match the workload
        model.generate_batch(warm, generation_config=gc, continuous_batching_config=cb,
                             persistent_manager=True)
        outs, secs = timer.time(lambda: model.generate_batch(prompts, generation_config=gc, progress_bar=True,
                                                             continuous_batching_config=cb,
                                                             persistent_manager=True))
    finally:
        model.destroy_cached_continuous_batching_manager()
    failed = [k for k, o in outs.items() if o.error is not None]
    if len(outs) != len(prompts) or failed:
        raise RuntimeError(f"generate_batch returned {len(outs)} of {len(prompts)} results, {len(failed)} failed")
    results = list(outs.values())
    return Timed([len(o.generated_tokens) for o in results], _span(results), secs, _cb_dict(cb))


def _manager_per_request(model: Any, prompts: list[list[int]], out_lens: list[int], warm: list[list[int]],
                         temperature: float, seed: int, settings: BaselineSettings, timer: DeviceTimer,
                         device: str) -> Timed:
    from transformers.generation.continuous_batching.utils import WorkloadHints

    gc, cb = _gen_config(temperature, max(out_lens)), _cb_config(settings, prompts, out_lens, seed, device)
    hints = WorkloadHints(max(map(len, prompts)), max(out_lens), len(prompts))

    def run(batch: list[list[int]], lens: list[int], bar: bool) -> list[Any]:
        ids = [manager.add_request(p, max_new_tokens=n, eos_token_id=-1) for p, n in zip(batch, lens, strict=True)]
        done: dict[str, Any] = {}
        with tqdm(total=len(ids), disable=not bar, desc="transformers") as pbar:
            while len(done) < len(ids):
                res = manager.get_result(timeout=1)
                if res is None:
                    if not manager.is_running():
                        raise RuntimeError("transformers generation thread stopped")
                    continue
                if res.is_finished():
                    if res.error is not None:
                        raise RuntimeError(f"transformers request failed: {res.error}")
                    done[res.request_id] = res
                    pbar.update(1)
        return [done[i] for i in ids]

    with model.continuous_batching_context_manager(generation_config=gc, continuous_batching_config=cb,
                                                   block=True, timeout=5, workload_hints=hints) as manager:
        run(warm, [min(out_lens)] * len(warm), False)
        results, secs = timer.time(lambda: run(prompts, out_lens, True))
    return Timed([len(o.generated_tokens) for o in results], _span(results), secs, _cb_dict(cb))


def _padded_generate(model: Any, prompts: list[list[int]], out_lens: list[int], warm: list[list[int]],
                     temperature: float, seed: int, settings: BaselineSettings, timer: DeviceTimer,
                     device: str) -> Timed:
    def run_batch(batch: list[list[int]], n: int) -> None:
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, p in enumerate(batch):  # left padding
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        gc = _gen_config(temperature, n)
        gc.min_new_tokens, gc.eos_token_id = n, None
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gc)

    torch.manual_seed(seed)
    run_batch(warm, min(out_lens))  # warm-up
    order = sorted(range(len(prompts)), key=lambda i: (out_lens[i], len(prompts[i])))
    batches = [order[i:i + settings.max_num_seqs] for i in range(0, len(order), settings.max_num_seqs)]
    secs = 0.0
    for idx in tqdm(batches, desc="transformers (padded)"):
        n = max(out_lens[i] for i in idx)  # every row runs to n tokens; each counts only its own length
        secs += timer.time(lambda idx=idx, n=n: run_batch([prompts[i] for i in idx], n))[1]
    return Timed(list(out_lens), secs, secs)


_APIS: dict[str, Callable[..., Timed]] = {
    "generate_batch": _generate_batch, "continuous_batching_manager": _manager_per_request,
    "padded_generate": _padded_generate,
}


def run_transformers(model_dir: str, device: str, dtype: torch.dtype, prompts: list[list[int]],
                     out_lens: list[int], warm: list[list[int]], temperature: float, seed: int,
                     settings: BaselineSettings) -> dict[str, Any]:
    """Run the workload through transformers; returns timings, token counts and the API used."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if settings.attn_implementation:
        kwargs["attn_implementation"] = settings.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, **kwargs).to(device).eval()
    timer = DeviceTimer(device)
    api = "padded_generate" if settings.api == "padded" else \
        ("generate_batch" if len(set(out_lens)) == 1 else "continuous_batching_manager")
    fallback_reason = None
    try:  # no inference_mode here: transformers' CB thread updates tensors made on this thread in place
        try:
            timed = _APIS[api](model, prompts, out_lens, warm, temperature, seed, settings, timer, device)
        except Exception as exc:  # noqa: BLE001 - any failure of the CB path falls back, with the reason kept
            if settings.api != "auto" or api == "padded_generate":
                raise
            fallback_reason, api = f"{type(exc).__name__}: {exc}", "padded_generate"
            timed = _padded_generate(model, prompts, out_lens, warm, temperature, seed, settings, timer,
                                            device)
        attn = getattr(model.config, "_attn_implementation", None)
    finally:
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"api": api, "fallback_reason": fallback_reason, "attn_implementation": attn, "wall_s": timed.wall_s,
            "call_s": timed.call_s, "output_token_counts": timed.counts, "continuous_batching_config": timed.cb_config}
