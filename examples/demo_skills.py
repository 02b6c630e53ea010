"""The demo's four skills: seeded generators of (prompt, completion) pairs, one per kind of task people
train adapters for — a classification, an arithmetic, a format transformation and an extraction.

Prompts are plain text ending in a field name and a colon; completions start with a space, the way
the tokenizer splits words, and the model learns to end them with its end-of-sequence token.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

SUBJECTS = ["the pasta", "the hotel room", "this phone", "the movie", "the service", "the concert", "this laptop",
            "the coffee", "the delivery", "the museum tour", "the hiking boots", "the app", "the pizza",
            "the book", "the train ride", "the headphones", "the staff", "the camera", "the salad", "the game",
            "the sofa", "the haircut", "the flight", "the soup", "the keyboard", "the garden",
            "the lecture"]  # fmt: skip
GOOD = ["was excellent", "was wonderful", "exceeded my expectations", "was a real delight", "worked perfectly",
        "was worth every penny", "made my day", "was fantastic", "felt great", "was superb", "was lovely",
        "impressed everyone", "was absolutely perfect", "was better than I hoped"]  # fmt: skip
BAD = ["was terrible", "was awful", "broke after a day", "was a waste of money", "disappointed me",
       "was cold and bland", "was painfully slow", "felt cheap", "was a disaster", "was very poor",
       "ruined the evening", "was far worse than advertised", "stopped working", "was dreadful"]  # fmt: skip
OPENERS = ["", "Honestly, ", "Overall, ", "I must say ", "To be fair, ", "Sadly, ", "Well, "]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]  # fmt: skip
DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
FIRST = ["Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Fatima", "Ivan", "Chloe", "Kwame",
         "Sofia", "Lucas", "Mei", "Noah", "Amara", "Jonas", "Elena", "Ravi"]  # fmt: skip
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Berg", "Silva", "Patel", "Nguyen", "Khan", "Petrov", "Martin",
        "Mensah", "Rossi", "Meyer", "Chen", "Brown", "Okafor", "Weber", "Costa", "Iyer"]  # fmt: skip
CITIES = ["Lisbon", "Osaka", "Nairobi", "Toronto", "Berlin", "Lima", "Oslo", "Cairo", "Denver", "Madrid",
          "Seoul", "Dublin", "Quito", "Perth", "Prague", "Austin", "Milan", "Hanoi", "Accra", "Zurich"]  # fmt: skip
ITEMS = ["a desk lamp", "two tickets", "a winter coat", "a coffee grinder", "three notebooks", "a bike helmet",
         "a phone case", "a tea set", "running shoes", "a backpack", "a wall clock", "a rain jacket"]  # fmt: skip
ORDER_SENTENCES = [
    "{name} from {city} ordered {item} on Monday; the order number is {code}.",
    "Order {code} was placed by {name} in {city} for {item}.",
    "Hi, this is {name} ({city}). I bought {item} and my order {code} has not arrived.",
    "Please refund {name}: {item}, order {code}, shipped to {city}.",
    "{name} called from {city} about {item} (ref {code}) that came damaged.",
    "Shipping update for {name}, {city}: {item} under order {code} leaves tomorrow.",
]


def sentiment_example(rng: random.Random) -> tuple[str, str]:
    """Classification: positive, negative, or mixed when the review says both."""
    label = rng.choice(["positive", "negative", "mixed"])
    subject, other = rng.sample(SUBJECTS, 2)
    opener = rng.choice(OPENERS)
    if label == "mixed":
        first, second = (GOOD, BAD) if rng.random() < 0.5 else (BAD, GOOD)
        text = f"{opener}{subject} {rng.choice(first)}, but {other} {rng.choice(second)}."
    else:
        words = GOOD if label == "positive" else BAD
        first, second = rng.sample(words, 2)
        text = f"{opener}{subject} {first}, and {other} {second}."
    return f"Review: {text[0].upper() + text[1:]}\nSentiment:", f" {label}"


def arithmetic_example(rng: random.Random) -> tuple[str, str]:
    """Arithmetic: the sum of two two-digit numbers, the answer alone."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"Compute {a} + {b}.\nResult:", f" {a + b}"


def date_example(rng: random.Random) -> tuple[str, str]:
    """Format transformation: an ISO 8601 date written out in words, month first."""
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, DAYS[month - 1])
    return f"Date: {year:04d}-{month:02d}-{day:02d}\nWritten out:", f" {MONTHS[month - 1]} {day}, {year}"


def order_example(rng: random.Random) -> tuple[str, str]:
    """Extraction: the customer and the order number from a support message, as ``name | code``."""
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    code = f"{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}-{rng.randint(1000, 9999)}"
    sentence = rng.choice(ORDER_SENTENCES).format(name=name, city=rng.choice(CITIES), item=rng.choice(ITEMS), code=code)
    return f"Message: {sentence}\nCustomer and order:", f" {name} | {code}"


@dataclass(frozen=True)
class Skill:
    name: str
    kind: str
    example: Callable[[random.Random], tuple[str, str]]
    rank: int
    steps: int


SKILLS = [
    Skill("sentiment", "classification", sentiment_example, rank=4, steps=120),
    Skill("arithmetic", "arithmetic", arithmetic_example, rank=16, steps=200),
    Skill("dates", "format transformation", date_example, rank=8, steps=60),
    Skill("orders", "extraction", order_example, rank=12, steps=60),
]


def sample_rows(example, seed: int, count: int, exclude: set[str] = frozenset()) -> list[dict[str, str]]:
    """``count`` distinct prompts (none in ``exclude``) with their answers."""
    rng, rows, seen = random.Random(seed), [], set(exclude)
    while len(rows) < count:
        prompt, completion = example(rng)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "completion": completion})
    return rows
