"""The built-in tokenizer: a byte-level BPE trained, deterministically, on the short English text below.

Nothing is downloaded. `make_model` writes it beside every random-weight checkpoint; the pre-tokenizer
pipeline is the one transformers 5 rebuilds for model_type qwen2, so every arch gets the same ids.
"""

from __future__ import annotations

from typing import Any

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
TOKENIZER_VOCAB = 1024  # trained BPE tokens + the two special tokens
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
It was a bright cold day in April, and the clocks were striking thirteen. The sun rose slowly over the hills.
Once upon a time there was a little girl who lived in a village near the forest. She liked to read books.
The train to the city leaves at seven in the morning and arrives just before noon, if it is on time.
Please remember to water the plants, feed the cat, and lock the door before you leave the house tonight.
Scientists have discovered that some birds can navigate by sensing the magnetic field of the Earth.
The history of the world is the history of people who moved, traded, argued, and learned from each other.
In the small kitchen, my grandmother made bread every Sunday, and the whole street smelled of it.
Water boils at one hundred degrees Celsius at sea level, but at a lower temperature on a high mountain.
Computers store numbers in binary, using only the digits zero and one to represent every value.
A good teacher asks questions that help students think for themselves instead of giving the answer.
She opened the window and listened to the rain falling on the roof; it was calm, quiet, and soft.
What time is it? Where are you going? Why did they decide to stay? How many apples are left in the box?
He said, "I will be back in ten minutes," but he did not return until the evening had already begun.
Music can change the mood of a room in a moment, turning a dull evening into a warm celebration.
The library opens at nine o'clock and closes at six, except on holidays when it is closed all day.
Children learn languages quickly because they listen carefully, repeat often, and are not afraid to fail.
The market was full of colors: red tomatoes, yellow lemons, green peppers, and purple onions.
In 1969, people walked on the Moon for the first time, and millions watched the event on television.
Our team worked hard all year, and in the end we finished the project two weeks ahead of schedule.
Good health depends on sleep, exercise, and food; none of them alone is enough to keep you well.
If you want to understand a machine, take it apart carefully and try to put it back together again.
The ocean covers more than seventy percent of the planet, yet most of it remains unexplored.
Thank you for your letter. I am happy to hear that you are well and that your new job is going fine.
The city council voted to build a new bridge across the river, which should reduce traffic downtown.
Every language has its own way of describing time, space, color, and the relations between people.
Stars are born in clouds of gas and dust, shine for millions or billions of years, and then fade away.
The recipe calls for two cups of flour, one egg, a pinch of salt, and half a cup of warm milk.
When the storm passed, the sky cleared and a rainbow appeared over the fields behind the farmhouse.
Doctors recommend washing your hands often, especially before eating and after being in public places.
The price of the ticket is twelve dollars for adults and five dollars for children under ten years old.
Mountains, deserts, forests, and rivers shape the way people live, work, travel, and build their homes.
A software engineer writes code, tests it, fixes the bugs, and then writes more code the next day.
The museum has a large collection of paintings, statues, coins, and old maps from many countries.
The first rule of the game is simple: each player takes one card, and the highest card wins the round.
It is important to read the instructions before you begin, because mistakes are hard to undo later.
Light travels faster than sound, which is why we see the lightning before we hear the thunder.
We should plan the trip carefully: book the hotel, buy the tickets, and check the weather forecast.
The number three is odd, the number four is even, and the number seven is often called lucky.
After dinner, they walked along the beach, talking about their dreams, their work, and their families.
"""


def build_tokenizer(model_max_length: int = 4096) -> Any:
    """Train the built-in byte-level BPE tokenizer (deterministic) and wrap it for transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # The pipeline transformers 5 rebuilds for model_type qwen2 (Qwen2Tokenizer): same ids for every arch.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB - 2, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    tok.add_special_tokens([BOS, EOS])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)
