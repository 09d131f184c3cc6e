"""`tiny-qwen2`: a small random-init Qwen2 model with a real byte-level BPE tokenizer.

Tests and smoke runs need a model that behaves like a real one (Qwen2 architecture, a chat
template, special tokens, loads in transformers and vLLM) but builds in seconds with no
network. Everything here is deterministic: the corpus comes from a seeded generator, BPE
training on a fixed corpus is deterministic, and the weights come from a seeded generator,
so every build yields the same files.
"""

from __future__ import annotations

import random
from pathlib import Path

# Bump when the output of `build_tiny_qwen2` changes, so stale caches get rebuilt.
VERSION = 1
SEED = 1234

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TARGET_VOCAB = 3072  # includes the special tokens

MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,  # head_dim 32
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)

# Qwen2's pre-tokenizer split: digits one at a time (good for arithmetic), letters in runs.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen-style ChatML. No default system prompt: tiny test sequences stay short.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = """
the a an and or but if then so because of to in on at by for with from into over under
is are was were be been has have had do does did can could will would should may might must
I you he she it we they me him her us them my your his its our their this that these those
what which who whom whose when where why how all any both each few more most other some such
no not only own same than too very just also now here there up down out off again once
one two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty
hundred thousand million first second third last next half double twice
time year day week month hour minute people way man woman child world life hand part place
case point number group problem fact question answer result total sum difference product
apple apples orange oranges book books pen pens ball balls car cars dog dogs cat cats bird
birds cookie cookies candy candies egg eggs box boxes bag bags coin coins dollar dollars cent
cents ticket tickets marble marbles flower flowers tree trees friend friends student students
teacher class school store shop farm farmer baker cake cakes pie pies page pages mile miles
meter meters gram grams liter liters price cost money pay paid buy buys bought sell sells sold
give gives gave get gets got make makes made take takes took have find finds found need needs
add adds added subtract multiply divide divided equal equals left remaining each every per
more less fewer many much than both together altogether spend spends spent save saves saved
Tom Anna Ben Lisa Sam Maria John Emma Leo Mia James Olivia Noah Ava Liam Sophia
think step carefully compute calculate therefore final so thus check verify correct wrong
yes no true false good great small large big little long short old new high low early late
hello hi thanks please sorry sure okay help helpful assistant user system question answer
""".split()

_VERBS = """
walk talk jump run play read write sing cook bake paint draw open close start finish
learn teach help work move carry push pull fill pack count share split plant pick wash
clean fix build climb swim travel visit watch listen answer ask call check follow
join keep leave lose win miss need plan reach return show stop turn use want wait
wonder measure weigh order collect deliver earn borrow lend rent charge print sort
invite arrive decide explain improve include increase decrease mark offer prepare
repeat solve test try wish guess train load save spend sell buy
""".split()
_NOUNS = """
animal answer apartment area army baby bank basket beach bed bicycle boat body bottle
bread bridge brother bus butter button cabin camera candle cap card carpet chair chicken
church city clock cloud coat computer corner country cousin cup daughter desk door
dress drink driver engine evening family father field finger fish floor forest fruit
game garden girl glass gold grass hat head heart hill home horse hospital hotel house
island jacket job juice key kitchen lake lamp leaf letter library light lunch machine
map market meal milk minute morning mother mountain music neighbor night notebook ocean
office painting paper park party pencil phone picture piece pizza plane plate player
pocket pool potato river road rock room salad sandwich sea season seat shirt shoe
shoulder sister song sound soup spoon sport square stair star station stone story
street sugar summer table tea team tomato town toy train truck uncle village wall
watch water weekend window winter wood word worker yard
""".split()
_ADJS = """
quick slow bright dark warm cold soft hard clean full empty heavy light happy sad
kind brave calm cheap rich poor fresh sweet loud quiet strong weak young tall
""".split()


def _word_forms() -> list[str]:
    """Inflected forms give BPE many distinct words to merge; the vocab lands near 3k."""
    forms = list(_WORDS)
    for v in _VERBS:
        stem = v[:-1] if v.endswith("e") else v
        forms += [v, v + "s", stem + "ing", stem + "ed", stem + "er", stem + "ers"]
    for n in _NOUNS:
        forms += [n, n + "s", n.capitalize()]
    for a in _ADJS:
        forms += [a, a + "er", a + "est", a + "ly", a + "ness"]
    return forms


_FORMS = _word_forms()

_NAMES = "Tom Anna Ben Lisa Sam Maria John Emma Leo Mia James Olivia Noah Ava Liam Sophia".split()
_ITEMS = "apples oranges books pens balls cookies candies eggs marbles flowers tickets coins".split()


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_FORMS) for _ in range(rng.randint(4, 14))]
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", ".", "!", "?", ";", ",", ":"])


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(1, 99)
    op = rng.choice("+-*/")
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    return rng.choice([
        f"{a} {op} {b} = {value}",
        f"What is {a} {op} {b}? #### {value}",
        f"Compute {a}{op}{b}. The answer is \\boxed{{{value}}}.",
        f"({a} + {b}) * 2 = {(a + b) * 2}",
        f"{a}.{b} - {b}% = {a}",
    ])


def _word_problem(rng: random.Random) -> str:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, price = rng.randint(2, 60), rng.randint(1, 40), rng.randint(1, 12)
    return (
        f"{name} has {a} {item}. {name} buys {b} more {item} for ${price} each. "
        f"How many {item} does {name} have now? {name} has {a} + {b} = {a + b} {item}. "
        f"The {item} cost {b} * {price} = ${b * price}.\n#### {a + b}"
    )


def corpus(n_lines: int = 6000) -> list[str]:
    """English-ish text, digits, arithmetic and word problems; the same list every call."""
    rng = random.Random(SEED)
    makers = [_sentence, _sentence, _arithmetic, _word_problem]
    lines = [rng.choice(makers)(rng) for _ in range(n_lines)]
    # A few chat-shaped lines so newlines and role names get tokens.
    lines += ["user\nWhat is 2 + 3?\nassistant\n2 + 3 = 5\n#### 5"] * 20
    lines += ["\"Quoted\" text, (parentheses), [brackets], {braces}; a-b_c/d\\e | ~ ` ^ & @ <tags>"] * 5
    return lines


def build_tokenizer():
    """Train a byte-level BPE on `corpus()` and wrap it like a Qwen2 tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        # The whole byte alphabet is in the vocab, so any text encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def build_tiny_qwen2(out_dir: Path) -> None:
    """Write the tokenizer, config, generation config and fp32 safetensors into `out_dir`."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **MODEL_SHAPE,
    )
    # A private RNG scope: seeding must not disturb the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    # Token ids only: vLLM takes default sampling parameters from this file, and the
    # rollout config, not the model, should decide them.
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
