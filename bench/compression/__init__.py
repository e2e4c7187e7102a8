"""Compression: the method interface and pipelines, the compressed sources and their mechanisms
(codebooks, quantisation, pruning, Tucker factors, entropy coding, generated edges), storage
accounting and the model file."""
