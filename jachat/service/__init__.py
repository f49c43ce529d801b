"""jachat's gRPC service: turns -> rinna prompt -> sentencepiece ids -> CTranslate2 -> streamed text."""
