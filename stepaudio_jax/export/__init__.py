"""Hugging Face interchange: export checkpoints as safetensors, import public Step1/SigLIP models.

Modules: orbax_reader (arrays out of a checkpoint, one at a time), step1_layout (the name and
layout table), safetensors_io (streaming shards), exporter, score (reference logits),
generate (sampling from a checkpoint's LM), hf_import, vision_import, torch_step1 (a PyTorch
Step1 to check exports against).
"""
