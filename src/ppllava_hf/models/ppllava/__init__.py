"""PPLLaVA in transformers' model layout: configuration, modeling, processing, video processing and decoding, the token
arithmetic they share, and the transformers internals they need. Flat single-dot imports only: this folder is what a
converted checkpoint ships as remote code."""
