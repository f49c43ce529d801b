"""Text and vocabulary: rinna's prompt format, sentencepiece, reply assembly. Pure: no I/O, no threads."""
