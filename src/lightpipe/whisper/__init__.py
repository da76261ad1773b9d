"""Whisper decoding: everything between Whisper's network (lightpipe.models.whisper) and the text a user reads.

    tokens.py      the one table of languages and the one `WhisperTokens` object (ids of the control tokens),
                   built from generation_config.json, the tokenizer or a CTranslate2 vocabulary
    decoding.py    prompt rules, language detection, `whisper_generate` (one 30 s window over generation/)
    timestamps.py  the timestamp grammar as a logits processor
    longform.py    the seek loop: an audio of any length decoded window by window (`transcribe`)
    alignment.py   word timing: the alignment heads' cross-attention recorded while decoding, aligned by DTW
    text.py        ids -> text, timed segments and words; the chunks of one input merged (`decode_asr`)

The ASR pipeline (tasks/automatic_speech_recognition.py) calls `transcribe` in its forward and `decode_asr` in its
postprocess. Nothing here is imported by generation/, which knows no architecture.
"""
