"""A tiny HF tokenizer built offline for tests: byte-level BPE trained on a few sentences,
wrapped in PreTrainedTokenizerFast with a Qwen-style chat template
(`<|im_start|>role\\ncontent<|im_end|>\\n`). Byte-level, so any text round-trips."""

from __future__ import annotations

import functools

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "What is 7 + 5? Put the final number after ####.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Let's think step by step and output the final answer after \"####\".",
    "The answer is 12. #### 12",
    "You are a helpful assistant. The capital of France is Paris.",
] * 4


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast
