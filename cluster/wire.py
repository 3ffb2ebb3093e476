"""Conversions between protobuf messages and engine types, shared by the router and the workers (torch-free)."""

from __future__ import annotations

from pdserve.v1 import generate_pb2 as pb

from cluster.sampling_params import SamplingParams


def sampling_from_proto(m: pb.SamplingParams) -> SamplingParams:
    """Proto -> SamplingParams with the documented defaults for unset fields (ValueError if invalid)."""
    d = SamplingParams()
    return SamplingParams(
        max_tokens=m.max_tokens if m.HasField("max_tokens") else d.max_tokens,
        temperature=m.temperature if m.HasField("temperature") else d.temperature,
        top_k=m.top_k if m.HasField("top_k") else d.top_k,
        top_p=m.top_p if m.HasField("top_p") else d.top_p,
        seed=m.seed if m.HasField("seed") else None,
        stop_token_ids=tuple(m.stop_token_ids),
        stop=tuple(m.stop),
        ignore_eos=m.ignore_eos,
        logprobs=m.logprobs if m.HasField("logprobs") else None,
    )


def sampling_to_proto(s: SamplingParams) -> pb.SamplingParams:
    """Validated SamplingParams -> proto with every field set (what workers receive)."""
    return pb.SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                             seed=s.seed, stop_token_ids=list(s.stop_token_ids), stop=list(s.stop),
                             ignore_eos=s.ignore_eos, logprobs=s.logprobs)


def logprobs_to_proto(token_id: int, entry: dict[int, float]) -> pb.TokenLogprobs:
    """One sampled token's logprob entry (the engine's {token: logprob} dict) as a message, best first."""
    top = sorted(((t, lp) for t, lp in entry.items()), key=lambda x: -x[1])
    return pb.TokenLogprobs(token_id=token_id, logprob=entry[token_id],
                            top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top])
