"""The engine: model execution over a paged KV cache with continuous batching (shared by both roles)."""

from cluster.engine.llm import LLM
from cluster.engine.llm_engine import EngineStats, LLMEngine
from cluster.engine.outputs import RequestOutput, StepOutput
from cluster.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineStats", "RequestOutput", "StepOutput", "SamplingParams"]
