"""Prompts as A1111 writes them, off the learning route: the plain path is tokenizer.py and the text encoders; this
package is what `SDBundle.conditioning` adds on top, and a prompt that uses none of it encodes to the same bits.

    parser.py      emphasis (word:1.2) ( ) [ ], escapes, BREAK; <lora:…> tags taken out (the LoRA hand-off)
    chunks.py      75-token chunks (comma backtrack, embedding vectors kept whole); one context length per run
    embeddings.py  textual-inversion files (A1111 .pt / .safetensors, diffusers, SDXL clip_l + clip_g), by file stem
    encode.py      chunks -> each tower's hidden states, vectors spliced in, weights and mean restoration, joined
    schedule.py    prompt editing [from:to:when] and [a|b]: which text each step uses (the pipeline's stages)

It imports only the core, and the core modules that use it (bundle, pipeline, params) call it by name.
"""
from .chunks import MAX_CONTEXT_CHUNKS, MAX_PROMPT_CHUNKS, PADDINGS, fit_conditionings
from .embeddings import Embedding, EmbeddingLibrary, read_embedding
from .encode import ReadPrompt, encode, read_prompt, text_towers
from .parser import EMPHASIS, PromptError, read_syntax, split_extra_networks

__all__ = ["EMPHASIS", "MAX_CONTEXT_CHUNKS", "MAX_PROMPT_CHUNKS", "PADDINGS", "Embedding", "EmbeddingLibrary",
           "PromptError", "ReadPrompt", "encode", "fit_conditionings", "read_embedding", "read_prompt",
           "read_syntax", "split_extra_networks", "text_towers"]
