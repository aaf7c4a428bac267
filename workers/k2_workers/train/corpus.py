"""The bundled demo corpus: simple English-like text generated deterministically from a tiny grammar.

It is small (a few hundred kilobytes), needs no download, and has enough structure (agreement, fixed phrases,
punctuation) that a tiny model's loss falls quickly, which is what demos and tests need.
"""

from __future__ import annotations

import random

_NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivo", "June", "Kai", "Lena"]
_ANIMALS = ["cat", "dog", "fox", "owl", "bee", "hen", "cow", "pig", "rat", "bat"]
_THINGS = ["ball", "book", "cup", "hat", "kite", "lamp", "map", "box", "key", "drum", "boat", "coat"]
_ADJECTIVES = ["red", "big", "small", "old", "new", "green", "quiet", "happy", "tired", "bright", "soft", "cold"]
_PLACES = ["park", "garden", "kitchen", "forest", "river", "market", "school", "house", "field", "hill"]
_VERBS_THING = ["found", "lost", "took", "painted", "carried", "dropped", "hid", "opened"]
_VERBS_ANIMAL = ["saw", "fed", "chased", "followed", "heard", "called", "watched", "washed"]
_TIMES = ["In the morning", "At noon", "Later that day", "In the evening", "At night", "One day"]
_FEELINGS = ["happy", "sad", "sleepy", "hungry", "proud", "surprised"]


def _sentence(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    kind = rng.randrange(6)
    if kind == 0:
        return f"{name} {rng.choice(_VERBS_THING)} the {rng.choice(_ADJECTIVES)} {rng.choice(_THINGS)}."
    if kind == 1:
        return f"{name} {rng.choice(_VERBS_ANIMAL)} a {rng.choice(_ANIMALS)} in the {rng.choice(_PLACES)}."
    if kind == 2:
        return f"{rng.choice(_TIMES)}, {name} went to the {rng.choice(_PLACES)}."
    if kind == 3:
        return f"The {rng.choice(_ANIMALS)} was {rng.choice(_FEELINGS)} because it was {rng.choice(_ADJECTIVES)}."
    if kind == 4:
        a, b = rng.sample(_NAMES, 2)
        return f'"Where is my {rng.choice(_THINGS)}?" asked {a}. {b} said, "It is in the {rng.choice(_PLACES)}."'
    count = rng.randrange(2, 10)
    return f"{name} had {count} {rng.choice(_THINGS)}s and gave one to the {rng.choice(_ANIMALS)}."


def generate_corpus(num_documents: int = 2000, seed: int = 0) -> list[str]:
    """`num_documents` short stories (3 to 8 sentences each); the same seed always gives the same text."""
    rng = random.Random(seed)
    return [" ".join(_sentence(rng) for _ in range(rng.randrange(3, 9))) for _ in range(num_documents)]
