"""Decoding a Step1 model on a KV cache: prompts, prefill, one-token steps, greedy decoding."""
