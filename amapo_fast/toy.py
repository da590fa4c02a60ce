"""The embedded default: a character-level tokenizer, a tiny Llama config and a generated preference task.

Everything here is built locally (no model or dataset hub), so `torchrun amapo_fast/train.py` runs out of
the box. The task is string editing: the prompt asks to copy, reverse or uppercase a random word; the chosen answer
does it right, the rejected answer has half of its letters wrong (a letter absent from the prompt, or left in
lowercase). A tiny random-init model learns to rank these within a few hundred steps on a CPU: the
uppercase pairs from token statistics within tens of steps, the copy/reverse pairs once it attends to the
prompt's letters; held-out ranking accuracy goes from chance to well above it.

Rows follow UltraFeedback-binarized's conversational format: `prompt` (the user's text), and `chosen`
and `rejected` as message lists that include the user turn and end with the assistant's answer.
"""
import random
import string

# Zephyr-style chat template (the format of the paper's Mistral-Base setup): BOS once at the start,
# every turn closed with EOS; the generation prompt opens the assistant turn.
TOY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " \n"


def _absent_letter(rng, prompt, letter):
    # Absent from the whole prompt, so that "letters seen in the prompt" is the feature to learn.
    return rng.choice(sorted(set(string.ascii_lowercase) - set(prompt.lower())))


def _lowercase_letter(rng, prompt, letter):
    return letter.lower()


# task: (prompt template, correct answer, how a letter of the rejected answer is corrupted). Uppercasing is
# learnt from token statistics alone (fast); copying and reversing need attention to the prompt (slower).
TASKS = {
    "copy": ("Copy the word: {word}", lambda word: word, _absent_letter),
    "reverse": ("Reverse the word: {word}", lambda word: word[::-1], _absent_letter),
    "uppercase": ("Uppercase the word: {word}", str.upper, _lowercase_letter),
}
WORD_LENGTHS = (4, 8)  # inclusive range of the words' lengths


def build_toy_tokenizer():
    """A character-level `PreTrainedTokenizerFast` with bos/eos/pad/unk, role tokens and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + list(ROLE_TOKENS)
    vocab = {token: index for index, token in enumerate(specials + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    # Every character is its own token; special tokens are matched before this split.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=TOY_CHAT_TEMPLATE,
        **SPECIAL_TOKENS,
    )
    # The template writes BOS itself; the tokenizer adds no special tokens on its own (like Llama 3's).
    return tokenizer


def tiny_llama_config(tokenizer, *, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, tie_embeddings=False):
    """A Llama-architecture config small enough to train on a CPU in a minute (random init, GQA)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_embeddings,
    )


def _toy_row(rng: random.Random):
    task = rng.choice(sorted(TASKS))
    template, solve, corrupt = TASKS[task]
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(*WORD_LENGTHS)))
    prompt, answer = template.format(word=word), solve(word)
    wrong = list(answer)
    for position in rng.sample(range(len(answer)), len(answer) // 2):
        wrong[position] = corrupt(rng, prompt, answer[position])
    wrong_answer = "".join(wrong)
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt,
        "chosen": [user, {"role": "assistant", "content": answer}],
        "rejected": [user, {"role": "assistant", "content": wrong_answer}],
        "task": task,
    }


def make_toy_preference_dataset(num_rows: int, seed: int):
    """`num_rows` generated preference pairs (a `datasets.Dataset`), reproducible from `seed`."""
    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_list([_toy_row(rng) for _ in range(num_rows)])
