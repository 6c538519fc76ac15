"""Hugging Face interchange: export what a run delivers as safetensors, import public Step1/SigLIP
models.

Modules: orbax_reader (a run's deliverable, one array at a time), step1_layout and speech_layout
(the name and layout tables), safetensors_io (streaming shards), exporter, hf_remote (the remote
code shipped with a Step1 export), score (reference logits or scores), generate (sampling from
a checkpoint's LM), parity (`export --check`), hf_import, vision_import, torch_step1 (PyTorch
Step1 LM and reward model) and torch_speech (PyTorch flow model and vocoder) to load exports.
"""
