"""Offline data pipelines: speech/text/image corpora -> tokenized ArrayRecord shards.

See README.md in this folder. Modules: grammar (sentences and answers), speak (espeak-ng),
audio (16 kHz mono, peak-normalised), features (log-mel), tokenizer (the AudioTokenizer
interface), kmeans_tokenizer (the built-in dual codebook), text_tokenizer (sentencepiece),
images (captioned shapes), beam_pipeline (audio files -> shards at scale), build_corpus (the
committed corpus).
"""
