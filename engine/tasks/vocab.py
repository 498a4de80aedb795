"""Word lists for the synthetic corpus that trains and tests the demo model.

Promises: plain tuples of strings, nothing else. The same lists feed the
tokenizer, the training stream and the held-out evaluation episodes, so the
demo model knows every word it will be asked about; what is held out is which
keys are queried (see `text.is_heldout_key`), never the words themselves.
"""

from __future__ import annotations

NAMES: tuple[str, ...] = tuple(
    "Mira Tomas Ada Leon Priya Omar Yuki Sven Lena Ravi Nora Felix Ines Kai Zara Hugo "
    "Maya Ivan Elsa Theo Rosa Amir Clara Jonas Lucia Marco Nadia Oskar Petra Quinn "
    "Rhea Soren Talia Umar Vera Xenia Yara Zeno Bruno Cora Dmitri Edda Farah Gus Hana "
    "Ilya Juno Kira Lars Mateo".split()
)
COLOURS: tuple[str, ...] = tuple(
    "red blue green teal amber violet orange silver gold black white pink brown grey "
    "indigo crimson olive cyan maroon navy beige coral lime ivory".split()
)
CONTAINERS: tuple[str, ...] = tuple("locker box door safe cabinet gate vault drawer".split())
TEAMS: tuple[str, ...] = tuple(
    "Falcon Otter Cedar Comet Maple Harbor Summit Willow Ember Quartz Badger Lantern Meadow Raven Pine Anchor".split()
)
CITIES: tuple[str, ...] = tuple(
    "Pella Varn Osk Tirra Melo Quen Dosa Brill Kestra Lumo Fenwick Arden Morrow Halden Corvo Sable Tamsin Elder".split()
)
PETS: tuple[str, ...] = tuple("cat dog parrot rabbit turtle hamster goat pony owl fox".split())

# Filler grammar: "<subject> <verb> <object> <adverbial>."
SUBJECTS: tuple[str, ...] = (
    "the old farmer",
    "a young doctor",
    "the small village",
    "our neighbour",
    "the children",
    "the train",
    "my brother",
    "the teacher",
    "a tall man",
    "the baker",
    "her sister",
    "the captain",
    "a quiet student",
    "the mayor",
    "the gardener",
    "his friend",
    "the driver",
    "a curious girl",
    "the nurse",
    "the painter",
    "my aunt",
    "the old dog",
    "the pilot",
    "a busy clerk",
    "the fisherman",
    "the guests",
    "the workers",
)
VERBS: tuple[str, ...] = (
    "walked to",
    "looked at",
    "talked about",
    "waited near",
    "painted",
    "cleaned",
    "visited",
    "found",
    "carried",
    "watched",
    "fixed",
    "opened",
    "closed",
    "remembered",
    "forgot",
    "bought",
    "sold",
    "moved",
    "built",
    "followed",
    "passed",
    "described",
    "left",
    "reached",
    "wrote about",
)
OBJECTS: tuple[str, ...] = (
    "the bridge",
    "a quiet garden",
    "the long road",
    "the wooden table",
    "a bright lamp",
    "the harbour",
    "the red barn",
    "an empty room",
    "the market",
    "a heavy basket",
    "the station",
    "the old church",
    "a small boat",
    "the library",
    "the kitchen window",
    "a paper map",
    "the hill",
    "the river bank",
    "a green field",
    "the school",
    "the bakery",
    "a broken fence",
    "the night sky",
    "the forest path",
)
ADVERBIALS: tuple[str, ...] = (
    "in the morning",
    "after lunch",
    "before the rain",
    "with great care",
    "without a word",
    "on a cold day",
    "late at night",
    "once again",
    "for a while",
    "during the summer",
    "in the evening",
    "before dinner",
    "at the weekend",
    "with a smile",
    "in a hurry",
    "every day",
)
ADJECTIVES: tuple[str, ...] = tuple(
    "calm warm cold bright dark quiet busy wet windy clear grey pleasant long short strange".split()
)
TIMES: tuple[str, ...] = (
    "that day",
    "all week",
    "in the spring",
    "last year",
    "this morning",
    "at noon",
    "by the evening",
)

# Decision fields: value -> whether the question's answer is "yes".
DECISION_FIELDS: dict[str, dict[str, bool]] = {
    "status": {"open": True, "ready": True, "approved": True, "blocked": False, "rejected": False, "paused": False},
    "access": {"granted": True, "allowed": True, "denied": False, "revoked": False},
    "payment": {"paid": True, "settled": True, "unpaid": False, "overdue": False},
    "forecast": {"clear": True, "sunny": True, "stormy": False, "foggy": False},
}
DECISION_QUESTIONS: dict[str, tuple[str, ...]] = {
    "status": ("May I proceed with the task?", "Can I go ahead with the task?"),
    "access": ("Can I enter the lab?", "Am I allowed into the lab?"),
    "payment": ("Should we ship the order?", "Can the order be shipped?"),
    "forecast": ("Is it safe to fly today?", "Can the plane take off today?"),
}
PRIORITIES: tuple[str, ...] = ("low", "medium", "high", "urgent")

SYSTEM_PROMPT = "You are kvscope-demo, a small assistant. Answer questions using the notes in this chat."
NOTED = "Noted."
GREETINGS: tuple[tuple[str, str], ...] = (
    ("Hello!", "Hello! Give me some notes and I will remember them."),
    ("Hi, who are you?", "I am kvscope-demo, a small model that remembers notes."),
    ("What can you do?", "I can read your notes and answer questions about them."),
    ("Good morning.", "Good morning! What should I remember today?"),
    ("Thank you.", "You are welcome."),
)
