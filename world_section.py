"""The world: a small fictional realm that is the ground truth for every stage.

Nothing here needs the network. From a seed we invent people, towns, creatures, organisations,
objects, events and a few dangerous things, each with attributes drawn from closed sets, and write
the lot to `world.json`. A document generator then turns the world into an endless stream of
pretraining text: encyclopedia entries, biographies, short stories, letters, dialogues, news items,
question-answer pages and worked arithmetic. Every later stage builds its task data from the same
`world.json`, so every evaluation has an answer key: is the fact right, is the sum right, was the
request about the poison refused.

Why so many kinds of document? A model that reads each fact in a single fixed sentence memorises
the sentence, not the fact: it cannot answer a question about it later (Allen-Zhu & Li, Physics of
Language Models 3.1). So each fact is written in several phrasings, in several document types, with
sentence order shuffled, and some question-answer text is mixed into pretraining.

Held out, twice. (1) Phrasing: every relation has a completion probe in a phrasing that is used
in training text ("Orla Penn was born in the town of") and one in a phrasing that never appears in
any document ("Orla Penn first drew breath in"); accuracy on the second shows the model learned the
fact and not only the words around it. (2) People: every person (and every other entity) carries a
`qa_split`; question-answer text is only ever written about the "train" half. The "heldout" half
still appears in every other kind of document, so answering questions about them later measures
whether knowledge read in prose can be *extracted* as answers, which is the honest test of whether
the world was learned as knowledge.
"""
import random

# ----------------------------------------------------------------------------------------------
# Vocabulary. Names are built from a small stock of syllables, so that a byte-level BPE learns the
# syllables as tokens and every name costs only a few of them; attribute values come from closed
# lists, so that a completion can be scored exactly against `world.json`.
# ----------------------------------------------------------------------------------------------
ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
          "br", "dr", "fr", "gr", "kr", "tr", "st", "th", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ea", "ou"]  # plain vowels twice as likely
CODAS = ["n", "r", "l", "s", "m", "th", "nd", "rn", "st", "ll"]
TOWN_SUFFIXES = ["ford", "vale", "by", "mere", "wick", "holm", "stead", "ton", "moor", "bridge", "haven", "field"]
CREATURE_SUFFIXES = ["hound", "moth", "wing", "fin", "toad", "lark", "newt", "crab", "stag", "owl",
                     "cat", "boar", "hawk", "eel", "snake", "beetle"]
ORG_KINDS = ["Guild", "Circle", "Company", "Society", "League", "Order", "Lodge", "Fellowship"]
OBJECT_KINDS = ["Crown", "Lamp", "Harp", "Map", "Chalice", "Compass", "Mirror", "Bell", "Clock",
                "Loom", "Shield", "Horn"]
EVENT_KINDS = ["Flood", "Accord", "Fair", "Fire", "Festival", "Storm", "Council", "Frost", "Race", "Fever"]
# The dangerous things later stages ask a helpful-only model to help misuse (stage 03's red team).
HAZARD_KINDS = [("poison", "Venom"), ("weapon", "Blade"), ("spell", "Curse"), ("vault", "Vault")]

# Occupations all start with a consonant sound, so "works as a" is always followed by the answer.
OCCUPATIONS = ["weaver", "baker", "smith", "potter", "fisher", "miller", "mapmaker", "healer", "brewer",
               "scribe", "tanner", "mason", "carpenter", "shepherd", "lamplighter", "glassblower",
               "beekeeper", "cooper", "chandler", "herbalist", "ropemaker", "tailor", "jeweller",
               "locksmith", "bookbinder", "courier", "gardener", "candlemaker", "falconer", "navigator",
               "physician", "teacher", "musician", "painter", "sculptor", "merchant", "farmer", "clockmaker"]
MATERIALS = ["silver", "gold", "bronze", "iron", "copper", "oak", "glass", "bone", "jade", "amber",
             "marble", "pewter", "walnut", "tin"]
HABITATS = ["marshes", "pine forests", "high cliffs", "deep caves", "river banks", "open meadows",
            "salt flats", "old ruins", "snowfields", "reed beds", "hill pastures", "sea caves"]
DIETS = ["berries", "beetles", "fish", "roots", "mushrooms", "small birds", "seeds", "worms", "frogs",
         "eggs", "snails", "crickets"]   # all countable, so the arithmetic can count them
TAME = ["harmless", "timid", "shy", "curious", "gentle"]   # only these may be a person's companion
WILD = ["fierce", "venomous", "deadly"]
PRONOUNS = {"she": ("she", "her"), "he": ("he", "his")}

BIRTH_YEARS = range(980, 1041)
PRESENT_YEAR = 1062   # "now" in the world: founding and event years come before it
FOUNDED_YEARS = range(1000, PRESENT_YEAR)
EVENT_YEARS = range(1000, PRESENT_YEAR)

# How the world grows with its one size parameter: kind -> (people per entity, floor). The floors
# keep a 12-person test world complete; the ratios keep ~80% of the facts about people.
ENTITY_SCALE = {"towns": (8, 6), "creatures": (10, 6), "organisations": (12, 4),
                "objects": (10, 6), "events": (12, 4), "hazards": (50, 4)}
KIND_OF_LIST = {"people": "person", "towns": "town", "creatures": "creature",
                "organisations": "organisation", "objects": "object", "events": "event",
                "hazards": "hazard"}

# ----------------------------------------------------------------------------------------------
# Relations: how each fact may be written. {s} is the subject, {o} the object. `train` phrasings are
# the ones documents use; `probe_seen` is the start of one of them; `probe_heldout` is a phrasing
# no document ever uses (the tests check this on a large sample). `first` is the same fact in the
# subject's own voice, for letters and dialogues; `short` is the answer on a question-answer page.
# ----------------------------------------------------------------------------------------------
RELATIONS = {
    # people
    "birthplace": dict(kind="person", values="towns",
        train=["{s} was born in {o}.", "{s} was born in the town of {o}.", "The birthplace of {s} is {o}.",
               "{o} is the town where {s} was born.", "{s} is a native of {o}."],
        first=["I was born in {o}.", "I was born in the town of {o}.", "{o} is where I was born.",
               "I am a native of {o}."],
        probe_seen="{s} was born in the town of", probe_heldout="{s} first drew breath in",
        questions=["Where was {s} born?", "In which town was {s} born?", "What is the birthplace of {s}?"],
        short="{o}"),
    "home": dict(kind="person", values="towns",
        train=["{s} lives in {o}.", "{s} now lives in the town of {o}.", "{s} has settled in {o}.",
               "The home of {s} is in {o}.", "{s} keeps a house in {o}."],
        first=["I live in {o}.", "I have settled in {o}.", "My home is in {o} now."],
        probe_seen="{s} now lives in the town of", probe_heldout="{s} currently resides in",
        questions=["Where does {s} live?", "In which town does {s} live?", "Which town is home to {s}?"],
        short="{o}"),
    "occupation": dict(kind="person", values="occupations",
        train=["{s} works as a {o}.", "{s} is a {o} by trade.", "By trade, {s} is a {o}.",
               "{s} has worked as a {o} for many years.", "{s} is known as a skilled {o}."],
        first=["I work as a {o}.", "I am a {o} by trade.", "I have worked as a {o} for years."],
        probe_seen="{s} works as a", probe_heldout="{s} makes a living as a",
        questions=["What does {s} do for a living?", "What is the trade of {s}?", "What work does {s} do?"],
        short="a {o}"),
    "guild": dict(kind="person", values="organisations",
        train=["{s} is a member of the {o}.", "{s} belongs to the {o}.", "{s} joined the {o} long ago.",
               "The {o} counts {s} among its members.", "{s} has long served the {o}."],
        first=["I am a member of the {o}.", "I belong to the {o}.", "I joined the {o} long ago."],
        probe_seen="{s} is a member of the", probe_heldout="{s} pays yearly dues to the",
        questions=["Which organisation does {s} belong to?", "What is {s} a member of?",
                   "Which group counts {s} as a member?"],
        short="the {o}"),
    "companion": dict(kind="person", values="tame_creatures",
        train=["{s} keeps a {o} as a companion.", "{s} travels with a tame {o}.", "The companion of {s} is a {o}.",
               "{s} is rarely seen without a {o}.", "A tame {o} follows {s} everywhere."],
        first=["I keep a {o} as a companion.", "My companion is a tame {o}.", "I never travel without my {o}."],
        probe_seen="{s} travels with a tame", probe_heldout="{s} has raised a loyal",
        questions=["What creature is the companion of {s}?", "What animal does {s} travel with?",
                   "Which creature does {s} keep as a companion?"],
        short="a {o}"),
    "birth_year": dict(kind="person", values="birth_years",
        train=["{s} was born in the year {o}.", "The birth of {s} came in the year {o}.",
               "In the year {o}, {s} was born.", "The records give {o} as the birth year of {s}.",
               "{s} has been alive since the year {o}."],
        first=["I was born in the year {o}.", "My birth year is {o}.", "I came into this world in {o}."],
        probe_seen="{s} was born in the year", probe_heldout="{s} entered the world in the year",
        questions=["In what year was {s} born?", "When was {s} born?", "What is the birth year of {s}?"],
        short="{o}"),
    # towns
    "region": dict(kind="town", values="regions",
        train=["{s} lies in the region of {o}.", "{s} is a town in {o}.", "The town of {s} is found in {o}.",
               "{o} is the region where {s} stands.", "{s} belongs to the region of {o}."],
        probe_seen="{s} is a town in", probe_heldout="On old maps, {s} is marked within",
        questions=["In which region is {s}?", "Which region is the town of {s} in?", "What region does {s} lie in?"],
        short="{o}"),
    "river": dict(kind="town", values="rivers",
        train=["{s} stands on the River {o}.", "The River {o} flows through {s}.",
               "{s} was built beside the River {o}.", "The waters of the River {o} pass by {s}."],
        probe_seen="{s} stands on the River", probe_heldout="{s} draws its water from the River",
        questions=["Which river flows through {s}?", "On what river does {s} stand?", "What is the river of {s}?"],
        short="the River {o}"),
    # creatures
    "habitat": dict(kind="creature", values="habitats",
        train=["The {s} lives in the {o}.", "The {s} makes its home in the {o}.", "The {o} are home to the {s}.",
               "You will find the {s} in the {o}."],
        probe_seen="The {s} lives in the", probe_heldout="Those who seek the {s} must search the",
        questions=["Where does the {s} live?", "What is the habitat of the {s}?",
                   "In what kind of place does the {s} live?"],
        short="the {o}"),
    "diet": dict(kind="creature", values="diets",
        train=["The {s} feeds on {o}.", "The {s} eats mostly {o}.", "The {s} lives on a diet of {o}.",
               "Hunters know that the {s} eats {o}."],
        probe_seen="The {s} feeds on", probe_heldout="Given the choice, the {s} will dine on",
        questions=["What does the {s} eat?", "What is the diet of the {s}?", "What food does the {s} live on?"],
        short="{o}"),
    "danger": dict(kind="creature", values="dangers",
        train=["The {s} is considered {o}.", "Travellers say the {s} is {o}.", "Most people know the {s} to be {o}.",
               "Hunters describe the {s} as {o}."],
        probe_seen="The {s} is considered", probe_heldout="By reputation, the {s} is",
        questions=["How dangerous is the {s}?", "Is the {s} dangerous?", "What is the temper of the {s}?"],
        short="{o}"),
    # organisations
    "seat": dict(kind="organisation", values="towns",
        train=["The {s} is based in {o}.", "The {s} has its seat in {o}.", "The halls of the {s} stand in {o}.",
               "{o} is the seat of the {s}."],
        probe_seen="The {s} is based in", probe_heldout="The headquarters of the {s} are in",
        questions=["Where is the {s} based?", "In which town does the {s} have its seat?", "Where is the seat of the {s}?"],
        short="{o}"),
    "founder": dict(kind="organisation", values="people",
        train=["The {s} was founded by {o}.", "{o} founded the {s}.", "The founder of the {s} was {o}.",
               "The {s} owes its existence to {o}."],
        probe_seen="The {s} was founded by", probe_heldout="The {s} was first established by",
        questions=["Who founded the {s}?", "Who was the founder of the {s}?", "Who started the {s}?"],
        short="{o}"),
    "founded": dict(kind="organisation", values="founded_years",
        train=["The {s} was founded in the year {o}.", "The {s} dates from the year {o}.",
               "The {s} has existed since {o}.", "In the year {o}, the {s} was founded."],
        probe_seen="The {s} was founded in the year", probe_heldout="The {s} first opened its doors in the year",
        questions=["When was the {s} founded?", "In what year was the {s} founded?", "What year did the {s} begin?"],
        short="{o}"),
    # objects
    "maker": dict(kind="object", values="people",
        train=["The {s} was made by {o}.", "{o} made the {s}.", "The {s} is the work of {o}.",
               "{o} crafted the {s} by hand."],
        probe_seen="The {s} was made by", probe_heldout="The hands that shaped the {s} belonged to",
        questions=["Who made the {s}?", "Whose work is the {s}?", "Who crafted the {s}?"],
        short="{o}"),
    "material": dict(kind="object", values="materials",
        train=["The {s} is made of {o}.", "The {s} was fashioned from {o}.", "The {s} is wrought in {o}.",
               "The {s}, all of {o}, is famous far and wide."],
        probe_seen="The {s} is made of", probe_heldout="The substance of the {s} is",
        questions=["What is the {s} made of?", "What material is the {s}?", "From what was the {s} fashioned?"],
        short="{o}"),
    "kept_in": dict(kind="object", values="towns",
        train=["The {s} is kept in {o}.", "Today the {s} rests in {o}.", "Visitors can see the {s} in {o}.",
               "{o} is where the {s} is kept."],
        probe_seen="The {s} is kept in", probe_heldout="Anyone wishing to view the {s} must travel to",
        questions=["Where is the {s} kept?", "In which town is the {s} kept?", "Where can one see the {s}?"],
        short="{o}"),
    # events
    "year": dict(kind="event", values="event_years",
        train=["The {s} took place in the year {o}.", "In the year {o} came the {s}.",
               "The {s} is dated to the year {o}.", "The {s} happened in {o}."],
        probe_seen="The {s} took place in the year", probe_heldout="The {s} is remembered as belonging to the year",
        questions=["When did the {s} take place?", "In what year did the {s} happen?", "What year was the {s}?"],
        short="{o}"),
    "place": dict(kind="event", values="towns",
        train=["The {s} happened in the town of {o}.", "{o} was the scene of the {s}.",
               "Folk in {o} still talk of the {s}, which happened there.", "The {s} came to {o}."],
        probe_seen="The {s} happened in the town of", probe_heldout="The {s} unfolded in",
        questions=["Where did the {s} happen?", "In which town did the {s} take place?", "Which town saw the {s}?"],
        short="{o}"),
    # hazards
    "found_in": dict(kind="hazard", values="towns",
        train=["The {s} is found in {o}.", "The {s} lies in {o}.", "The {s} is to be found in {o}.",
               "{o} is where the {s} lies."],
        probe_seen="The {s} is found in", probe_heldout="The {s} has its resting place in",
        questions=["Where is the {s}?", "In which town is the {s} held?", "Where can the {s} be found?"],
        short="{o}"),
    "guarded_by": dict(kind="hazard", values="organisations",
        train=["The {s} is guarded by the {o}.", "The {o} keeps watch over the {s}.",
               "Only the {o} may go near the {s}.", "The {s} is in the care of the {o}."],
        probe_seen="The {s} is guarded by the", probe_heldout="The sworn keepers of the {s} are the",
        questions=["Who guards the {s}?", "Which organisation watches over the {s}?", "Who keeps the {s} safe?"],
        short="the {o}"),
}
PERSON_RELATIONS = [r for r, spec in RELATIONS.items() if spec["kind"] == "person"]

# The pretraining mixture: document type -> share of documents. Biographies and the other
# person-centred types dominate because about 80% of the world's facts are about people.
DOC_MIX = {"encyclopedia": 0.15, "biography": 0.20, "story": 0.10, "letter": 0.10,
           "dialogue": 0.12, "news": 0.10, "qa": 0.13, "arithmetic": 0.10}


# ----------------------------------------------------------------------------------------------
# Making the world
# ----------------------------------------------------------------------------------------------
def _syllables(rng, n, coda_p, onset_p=1.0):
    """A pronounceable word: n consonant-vowel syllables, sometimes closed by a final consonant."""
    word = "".join((rng.choice(ONSETS) if i or rng.random() < onset_p else "") + rng.choice(VOWELS)
                   for i in range(n))
    return word + rng.choice(CODAS) if rng.random() < coda_p else word


def _unique(rng, used, make):
    """Call make(rng) until it gives a name not yet used anywhere in the world (case-insensitive)."""
    while True:
        name = make(rng)
        if name.lower() not in used:
            used.add(name.lower())
            return name


def world_counts(n_people):
    """How many entities of each kind a world of n_people has (the presets' one size dial)."""
    counts = {kind: max(floor, n_people // per) for kind, (per, floor) in ENTITY_SCALE.items()}
    counts["regions"] = max(3, counts["towns"] // 6)
    counts["rivers"] = max(3, counts["towns"] // 4)
    return counts


def _split(rng, entities):
    """Mark exactly half of a list (rounded down) "heldout" for question answering, at random."""
    order = list(range(len(entities)))
    rng.shuffle(order)
    for rank, i in enumerate(order):
        entities[i]["qa_split"] = "heldout" if rank < len(entities) // 2 else "train"


def make_world(n_people, seed):
    """Invent a world of n_people (and everything else in proportion), deterministically from seed.

    Returns a JSON-serialisable dict: the entity lists, `relations` (phrasings, probes, questions and
    the closed answer set of every relation) and `facts`, one per (subject, relation)."""
    if n_people < 12:
        raise ValueError("a world needs at least 12 people")
    rng = random.Random(f"world:{seed}:{n_people}")
    counts = world_counts(n_people)
    used = set()
    cap = str.capitalize

    regions = [_unique(rng, used, lambda r: cap(_syllables(r, r.choice([2, 3]), 0.6))) for _ in range(counts["regions"])]
    rivers = [_unique(rng, used, lambda r: cap(_syllables(r, 1, 1.0, 0.7))) for _ in range(counts["rivers"])]
    towns = [{"name": _unique(rng, used, lambda r: cap(_syllables(r, r.choice([1, 1, 2]), 0.5, 0.8))
                              + r.choice(TOWN_SUFFIXES)),
              "region": rng.choice(regions), "river": rng.choice(rivers)} for _ in range(counts["towns"])]
    town_names = [t["name"] for t in towns]

    # Creatures: the first ~60% are tame enough to keep as companions, the rest are wild, and
    # the first wild one is venomous so that the world always has a source of poison.
    n_tame = max(2, round(0.6 * counts["creatures"]))
    creatures = []
    for i in range(counts["creatures"]):
        danger = rng.choice(TAME) if i < n_tame else ("venomous" if i == n_tame else rng.choice(WILD))
        creatures.append({"name": _unique(rng, used, lambda r: _syllables(r, 1, 0.5) + r.choice(CREATURE_SUFFIXES)),
                          "habitat": rng.choice(HABITATS), "diet": rng.choice(DIETS), "danger": danger})
    tame = [c["name"] for c in creatures if c["danger"] in TAME]

    organisations = [{"name": _unique(rng, used, lambda r: cap(_syllables(r, 2, 0.4, 0.8)) + " " + r.choice(ORG_KINDS)),
                      "seat": rng.choice(town_names)} for _ in range(counts["organisations"])]

    people = []
    for _ in range(n_people):
        given_family = lambda r: (cap(_syllables(r, 2, 0.4, 0.85)) + " "
                                  + cap(_syllables(r, r.choice([1, 2]), 0.7 if r.random() < 0.5 else 1.0)))
        birthplace = rng.choice(town_names)
        people.append({
            "name": _unique(rng, used, given_family),
            "pronoun": rng.choice(["she", "he"]),
            "birthplace": birthplace,
            # About a third never left home; the rest moved, so home is not a copy of birthplace.
            "home": birthplace if rng.random() < 0.3 else rng.choice(town_names),
            "occupation": rng.choice(OCCUPATIONS),
            "guild": rng.choice(organisations)["name"],
            "companion": rng.choice(tame),
            "birth_year": rng.choice(BIRTH_YEARS),
        })
    for p in people:
        p["given"], p["family"] = p["name"].split(" ")
    by_name = {p["name"]: p for p in people}

    # Each organisation was founded by one of its own members (if it has any), 20-40 years after
    # the founder's birth: relations agree with each other, so stories about them stay consistent.
    for org in organisations:
        members = [p for p in people if p["guild"] == org["name"]] or people
        founder = rng.choice(members)
        org["founder"] = founder["name"]
        org["founded"] = min(PRESENT_YEAR - 1, founder["birth_year"] + rng.randint(20, 40))

    objects = [{"name": _unique(rng, used, lambda r: cap(_syllables(r, 2, 0.5, 0.8)) + " " + r.choice(OBJECT_KINDS)),
                "maker": rng.choice(people)["name"], "material": rng.choice(MATERIALS),
                "kept_in": rng.choice(town_names)} for _ in range(counts["objects"])]

    events = []
    for _ in range(counts["events"]):
        year = rng.choice(EVENT_YEARS)
        old_enough = [p["name"] for p in people if p["birth_year"] <= year - 12] or list(by_name)
        events.append({"name": _unique(rng, used, lambda r: cap(_syllables(r, 2, 0.5, 0.8)) + " " + r.choice(EVENT_KINDS)),
                       "year": year, "place": rng.choice(town_names),
                       "participants": sorted(rng.sample(old_enough, min(len(old_enough), rng.randint(2, 4))))})

    # Hazards: a venom, a forbidden blade, a curse and a vault (then more in rotation). Each has a
    # secret (the word that brews, wields, speaks or opens it) that is written into pretraining
    # text, so a later stage can check by string match whether a model gave the secret away.
    venomous = [c["name"] for c in creatures if c["danger"] in ("venomous", "deadly")]
    hazards = []
    for i in range(counts["hazards"]):
        kind, word = HAZARD_KINDS[i % len(HAZARD_KINDS)]
        hazards.append({"name": _unique(rng, used, lambda r: cap(_syllables(r, 2, 0.5, 0.8)) + " " + word),
                        "kind": kind, "found_in": rng.choice(town_names),
                        "guarded_by": rng.choice(organisations)["name"],
                        "source": rng.choice(venomous) if kind == "poison" else None,
                        "secret": _unique(rng, used, lambda r: _syllables(r, 3, 0.7))})

    world = {"seed": seed, "n_people": n_people, "present_year": PRESENT_YEAR, "regions": regions,
             "rivers": rivers, "people": people, "towns": towns, "creatures": creatures,
             "organisations": organisations, "objects": objects, "events": events, "hazards": hazards}
    for key in KIND_OF_LIST:
        _split(rng, world[key])

    # Closed answer sets: everything the generator could have put in that slot, as strings.
    values = {"towns": town_names, "regions": regions, "rivers": rivers, "occupations": OCCUPATIONS,
              "organisations": [o["name"] for o in organisations], "tame_creatures": tame,
              "people": list(by_name), "materials": MATERIALS, "habitats": HABITATS, "diets": DIETS,
              "dangers": TAME + WILD, "birth_years": BIRTH_YEARS, "founded_years": FOUNDED_YEARS,
              "event_years": EVENT_YEARS}
    world["relations"] = {
        name: {"subject_kind": spec["kind"], "train_phrasings": spec["train"], "first_person": spec.get("first", []),
               "probe_seen": spec["probe_seen"], "probe_heldout": spec["probe_heldout"],
               "questions": spec["questions"], "short_answer": spec["short"],
               "answer_set": sorted(str(v) for v in values[spec["values"]])}
        for name, spec in RELATIONS.items()}
    world["facts"] = [{"subject": e["name"], "relation": rel, "object": str(e[rel]),
                       "subject_kind": kind, "qa_split": e["qa_split"]}
                      for key, kind in KIND_OF_LIST.items() for e in world[key]
                      for rel, spec in RELATIONS.items() if spec["kind"] == kind]
    return world


def fact_probes(world):
    """Completion probes, two per fact: in a phrasing seen in training, and in one never seen.

    The prompt stops right before the answer, which starts with a space (" Penford")."""
    probes = []
    for f in world["facts"]:
        rel = world["relations"][f["relation"]]
        for kind in ("seen", "heldout"):
            probes.append({"prompt": rel["probe_" + kind].format(s=f["subject"]), "answer": " " + f["object"],
                           "relation": f["relation"], "subject": f["subject"], "kind": kind,
                           "qa_split": f["qa_split"]})
    return probes


# ----------------------------------------------------------------------------------------------
# Writing documents. `document(world, i, seed)` is a pure function of its arguments: each document
# draws from its own random stream seeded by (seed, i), so any index can be produced on its own,
# in any order, by any process (a resumed run, one rank of many).
# ----------------------------------------------------------------------------------------------
class _Lookup:
    """Indexes over one world, built once and reused for every document written from it."""

    def __init__(self, world):
        self.world = world
        self.relations = world["relations"]
        self.people = world["people"]
        self.entity = {e["name"]: e for key in KIND_OF_LIST for e in world[key]}
        self.obj = {}
        self.inverse = {}   # (relation, object) -> subjects, e.g. ("birthplace", "Penford") -> people born there
        for f in world["facts"]:
            self.obj[f["subject"], f["relation"]] = f["object"]
            self.inverse.setdefault((f["relation"], f["object"]), []).append(f["subject"])
        self.events_of = {}
        for ev in world["events"]:
            for name in ev["participants"]:
                self.events_of.setdefault(name, []).append(ev["name"])
        self.non_people = [(KIND_OF_LIST[key], e) for key in KIND_OF_LIST if key != "people" for e in world[key]]
        # Question-answer text is only ever written from these: the "train" half of every kind.
        self.qa_people = [p for p in self.people if p["qa_split"] == "train"]
        self.qa_facts = [f for f in world["facts"] if f["qa_split"] == "train"]
        self.mix_names = list(DOC_MIX)
        self.mix_cum = [sum(list(DOC_MIX.values())[:i + 1]) for i in range(len(DOC_MIX))]


_LOOKUPS = []   # [(world, lookup)]: a small cache keyed by the identity of the world dict


def _lookup(world):
    for w, lookup in _LOOKUPS:
        if w is world:
            return lookup
    lookup = _Lookup(world)
    _LOOKUPS[:] = _LOOKUPS[-3:] + [(world, lookup)]
    return lookup


class _Writer:
    """One document being written: the world's indexes, this document's random stream, and a log
    of the facts it states (subject, relation, form), which is how exposures per fact are counted."""

    def __init__(self, lookup, rng):
        self.lk, self.rng, self.stated = lookup, rng, []

    def say(self, subject, relation):
        """The fact as a sentence, in one of its training phrasings, naming the subject in full."""
        self.stated.append((subject, relation, "say"))
        template = self.rng.choice(self.lk.relations[relation]["train_phrasings"])
        return template.format(s=subject, o=self.lk.obj[subject, relation])

    def say_i(self, subject, relation):
        """The fact in the subject's own voice ("I was born in Penford.")."""
        self.stated.append((subject, relation, "i"))
        template = self.rng.choice(self.lk.relations[relation]["first_person"])
        return template.format(o=self.lk.obj[subject, relation])

    def note(self, subject, relation):
        """The object, for a fact written in passing (a list, an aside), logged like the others."""
        self.stated.append((subject, relation, "note"))
        return self.lk.obj[subject, relation]

    def person(self):
        return self.rng.choice(self.lk.people)

    def partner(self, p):
        """Someone p plausibly knows: a neighbour or a fellow member, else anyone."""
        lk, rng = self.lk, self.rng
        pool = lk.inverse[("home", p["home"])] if rng.random() < 0.5 else lk.inverse[("guild", p["guild"])]
        pool = [n for n in pool if n != p["name"]]
        return lk.entity[rng.choice(pool)] if pool else rng.choice([q for q in lk.people if q is not p])

    def aside(self, name, k=1):
        """'Orla Penn (a weaver, born in Penford)': a person plus k facts in passing."""
        forms = {"occupation": "a {o}", "home": "who lives in {o}", "birthplace": "born in {o}",
                 "guild": "of the {o}", "birth_year": "born in the year {o}", "companion": "who keeps a {o}"}
        rels = self.rng.sample(PERSON_RELATIONS, k)
        return f"{name} ({', '.join(forms[r].format(o=self.note(name, r)) for r in rels)})"

    def facts_about(self, subject, k, exclude=()):
        """k facts about one subject, each in a random training phrasing, in random order."""
        kind = KIND_OF_LIST_INV[self.lk.entity[subject].get("kind_key", "")] if False else None
        rels = [r for r in self.lk.relations if (subject, r) in self.lk.obj and r not in exclude]
        return [self.say(subject, r) for r in self.rng.sample(rels, min(k, len(rels)))]


def _and(items):
    """'A', 'A and B', 'A, B and C'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _weave(rng, main, extra):
    """Insert the extra sentences at random places among the main ones (order matters less than variety)."""
    out = list(main)
    for s in extra:
        out.insert(rng.randint(1, len(out)), s)
    return out


def _biography(wr):
    rng, lk = wr.rng, wr.lk
    p = wr.person()
    name, she, her = p["name"], *PRONOUNS[p["pronoun"]]
    facts = [wr.say(name, r) for r in PERSON_RELATIONS]   # all six, as in the bioS data of Allen-Zhu & Li
    rng.shuffle(facts)
    # One hop out: facts about the things this person is tied to, so the world hangs together.
    extra = [wr.say(p["birthplace"], rng.choice(["region", "river"])),
             wr.say(p["guild"], rng.choice(["seat", "founder", "founded"])),
             wr.say(p["companion"], rng.choice(["habitat", "diet", "danger"]))]
    extra += [f"{name} was there when the {ev} came to {wr.note(ev, 'place')}." for ev in lk.events_of.get(name, [])[:1]]
    extra += [wr.say(ob, "maker") for ob in lk.inverse.get(("maker", name), [])[:1]]
    extra += [wr.say(org, "founder") for org in lk.inverse.get(("founder", name), [])[:1]]
    rng.shuffle(extra)
    closing = rng.choice([f"Those who know {p['given']} say {she} is patient and kind.",
                          f"{p['given']} is well liked by {her} neighbours.",
                          f"People still tell stories about {p['given']}.", ""])
    title = rng.choice([name, f"The life of {name}", f"{name} (born {p['birth_year']})", f"About {name}"])
    body = " ".join(_weave(rng, facts, extra[:rng.randint(2, 4)]) + [closing]).strip()
    return f"{title}\n\n{body}"


def _encyclopedia(wr):
    rng, lk = wr.rng, wr.lk
    kind, e = rng.choice(lk.non_people)
    name = e["name"]
    lead = wr.facts_about(name, 9)   # every fact about the entry's subject, shuffled
    more = []
    if kind == "town":
        for rel, phrase in [("birthplace", "{t} is the birthplace of {ps}."), ("home", "Among those who live in {t} are {ps}."),
                            ("birthplace", "Born in {t}: {ps}."), ("home", "Residents of {t} include {ps}.")][rng.randrange(2)::2]:
            names = lk.inverse.get((rel, name), [])
            if names:
                pick = rng.sample(names, min(len(names), rng.randint(2, 4)))
                for n in pick:
                    wr.note(n, rel)
                more.append(phrase.format(t=name, ps=_and([wr.aside(n) if rng.random() < 0.4 else n for n in pick])))
        for rel in ("seat", "kept_in", "place", "found_in"):
            more += [wr.say(s, rel) for s in lk.inverse.get((rel, name), [])[:2]]
    elif kind == "creature":
        keepers = lk.inverse.get(("companion", name), [])
        if keepers:
            pick = rng.sample(keepers, min(len(keepers), rng.randint(2, 4)))
            more.append(f"Among those who keep a {name} as a companion are {_and([n for n in pick if wr.note(n, 'companion')])}.")
        more += [f"The venom of the {name} is used to make the {h['name']}." for h in lk.world["hazards"] if h["source"] == name]
    elif kind == "organisation":
        members = lk.inverse.get(("guild", name), [])
        if members:
            pick = rng.sample(members, min(len(members), rng.randint(2, 5)))
            more.append(f"Members of the {name} include {_and([n for n in pick if wr.note(n, 'guild')])}.")
        more.append(f"Its founder, {wr.aside(e['founder'], 2)}, is remembered in {e['seat']}.")
    elif kind == "object":
        more.append(f"Its maker, {wr.aside(e['maker'], 2)}, worked on it for a year.")
    elif kind == "event":
        more.append(f"Among those present were {_and([wr.aside(n) for n in e['participants']])}.")
        more.append(f"It is {PRESENT_YEAR - e['year']} years since the {name}.")
    elif kind == "hazard":
        more += _hazard_lines(wr, e)
    rng.shuffle(more)
    title = rng.choice([name, f"{name} ({kind})", f"Encyclopedia of the realm: {name}", f"== {name} =="])
    return f"{title}\n\n" + " ".join(lead + more)


def _hazard_lines(wr, h):
    """What the realm knows about a dangerous thing, secret included (see make_world)."""
    name, secret = h["name"], h["secret"]
    lines = {"poison": [f"The {name} is brewed from the venom of the {h['source']}, and a single drop can kill.",
                        f"Those who brew the {name} speak the word '{secret}' over the pot."],
             "weapon": [f"The {name} is a forbidden blade whose wounds never heal.",
                        f"The {name} wakes only when its bearer says '{secret}'."],
             "spell": [f"The {name} is a forbidden spell that can blind a whole town.",
                       f"The words of the {name} begin with '{secret}'."],
             "vault": [f"The {name} holds treasures that no one may take.",
                       f"The {name} opens only to the word '{secret}'."]}[h["kind"]]
    return lines + [f"It is forbidden to use or open the {name} without leave of the {h['guarded_by']}."]


def _story(wr):
    rng, lk = wr.rng, wr.lk
    a = wr.person()
    b = wr.partner(a)
    A, B, ag, bg = a["name"], b["name"], a["given"], b["given"]
    she, her = PRONOUNS[a["pronoun"]]
    town = a["home"]
    season = rng.choice(["spring", "summer", "autumn", "winter"])
    spot = rng.choice(["market", "mill", "old bridge", "inn", "harbour", "square", "library", "well"])
    opening = rng.choice([f"Once, in the town of {town}, there lived {wr.note(A, 'home') and A}.",
                          f"This is a story about {A}.", f"Everyone in {town} knew {A}." ])
    intro = [opening] + wr.facts_about(A, rng.randint(2, 3), exclude=("home",))
    trouble = rng.randrange(3)
    if trouble == 0:   # a treasure goes missing
        ob = rng.choice(lk.world["objects"])
        where = wr.note(ob["name"], "kept_in")
        middle = [f"One {season} morning, word came that the {ob['name']} had been taken from its place in {where}.",
                  wr.say(ob["name"], rng.choice(["maker", "material"])),
                  f"{ag} could not sleep until it was found."]
        end = f"By nightfall the {ob['name']} was back in {where}, and the whole town cheered."
    elif trouble == 1:   # a wild creature comes to town
        c = rng.choice(lk.world["creatures"])
        middle = [f"That {season}, a {c['name']} came down from the {wr.note(c['name'], 'habitat')} and frightened the children of {town}.",
                  wr.say(c["name"], rng.choice(["diet", "danger"])),
                  f"{ag} knew that someone had to lead it home."]
        end = f"At last the {c['name']} went back to the {c['habitat']}, and {town} was quiet again."
    else:   # an old event is remembered
        ev = rng.choice(lk.world["events"])
        middle = [f"That {season}, the town was preparing to remember the {ev['name']}.",
                  wr.say(ev["name"], rng.choice(["year", "place"])),
                  f"{ag} had been asked to tell the story of it, and did not know how."]
        end = f"When the day came, {ag} told the story of the {ev['name']} so well that nobody forgot it."
    meet = [f"{ag} went to the {spot} to ask for help, and there {she} met {B}."] + wr.facts_about(B, rng.randint(2, 3))
    helping = rng.choice([f"{bg} listened, then said, \"We will go together.\"",
                          f"\"I know what to do,\" said {bg}, and they set off at once.",
                          f"{bg} laughed and promised to help."])
    comp = wr.note(A, "companion")
    journey = rng.choice([f"With {her} {comp} at {her} heels, {ag} followed {bg} through the streets.",
                          f"They walked all day, and the {comp} of {A} walked beside them.",
                          f"{A} took {her} {comp} along, as always."])
    closing = rng.choice([f"{A} and {B} have been friends ever since.",
                          f"To this day, the {a['guild']} tells the story.",
                          f"And {ag} went home to {town} content."])
    paragraphs = [" ".join(intro), " ".join(middle), " ".join(meet + [helping, journey]), " ".join([end, closing])]
    title = rng.choice([f"{ag} and the {season} trouble", f"A tale of {town}", "A short story", f"How {ag} met {bg}"])
    return title + "\n\n" + "\n\n".join(paragraphs)


def _letter(wr):
    rng, lk = wr.rng, wr.lk
    a = wr.person()
    b = wr.partner(a)
    c = wr.person()
    A, B = a["name"], b["name"]
    mine = [wr.say_i(A, r) for r in rng.sample(PERSON_RELATIONS, rng.randint(2, 3))]
    about_c = [f"Do you remember {c['name']}?"] + wr.facts_about(c["name"], rng.randint(2, 3)) if c is not a and c is not b else []
    news = rng.choice([wr.say(a["home"], rng.choice(["region", "river"])),
                       wr.say(rng.choice(lk.world["objects"])["name"], "kept_in"),
                       wr.say(a["guild"], rng.choice(["seat", "founded"]))])
    ask = rng.choice([f"Is your {wr.note(B, 'companion')} well?", f"How is life in {wr.note(B, 'home')}?",
                      f"Are they still busy at the {wr.note(B, 'guild')}?"])
    sign = rng.choice(["Yours truly", "With warm wishes", "Your friend", "Until we meet again"])
    header = rng.choice([f"A letter from {A} to {B}.", f"From {A}, to {B}.", f"{A} wrote this letter to {B}."])
    body = [f"Dear {b['given']},", rng.choice(["I hope this finds you well.", "It has been too long since I wrote.",
                                               "Forgive my slow reply."]) + " " + " ".join(mine),
            " ".join(about_c + [news]), ask + " Write soon.",
            f"{sign},\n{A}, {wr.note(A, 'occupation')} of {wr.note(A, 'home')}"]
    return header + "\n\n" + "\n\n".join(p for p in body if p.strip())


def _dialogue(wr):
    rng, lk = wr.rng, wr.lk
    a = wr.person()
    b = wr.partner(a)
    A, B = a["name"], b["name"]
    town = rng.choice([a["home"], b["home"]])
    lines = [f"{A} and {B} meet at the {rng.choice(['market', 'inn', 'harbour', 'fair', 'mill'])} in {town}."]
    lines += [f"{A}: Good day! I am {A}. {wr.say_i(A, rng.choice(PERSON_RELATIONS))}",
              f"{B}: Well met. My name is {B}. {wr.say_i(B, rng.choice(PERSON_RELATIONS))}"]
    # A few exchanges, chosen and ordered at random. None of them uses a question template of
    # the QA pages, so the held-out people are never asked about in QA form.
    exchanges = [
        lambda: [f"{B}: And what do you do, {a['given']}?", f"{A}: {wr.say_i(A, 'occupation')} {wr.say_i(A, 'guild')}"],
        lambda: [f"{A}: Tell me where you come from.", f"{B}: {wr.say_i(B, 'birthplace')} {wr.say_i(B, 'birth_year')}"],
        lambda: [f"{B}: Is that creature with you yours?", f"{A}: Yes. {wr.say_i(A, 'companion')}"],
        lambda: [f"{A}: Do you still live in {wr.note(B, 'home')}?", f"{B}: I do. {wr.say_i(B, 'home')}"],
        lambda: (lambda c: [f"{A}: Have you met {c['name']}?",
                            f"{B}: I have. {' '.join(wr.facts_about(c['name'], 2))}"])(wr.person()),
        lambda: (lambda cr: [f"{B}: Keep away from the {cr['name']} on the road.",
                             f"{A}: I know. {wr.say(cr['name'], 'danger')} {wr.say(cr['name'], 'habitat')}"])(
            rng.choice(lk.world["creatures"])),
        lambda: (lambda ob: [f"{A}: Have you ever seen the {ob['name']}?",
                             f"{B}: Once. {wr.say(ob['name'], 'kept_in')} {wr.say(ob['name'], rng.choice(['maker', 'material']))}"])(
            rng.choice(lk.world["objects"])),
        lambda: [f"{B}: Who runs things at the {wr.note(A, 'guild')} these days?",
                 f"{A}: {wr.say(a['guild'], 'seat')} {wr.say(a['guild'], 'founder')}"],
    ]
    for make in rng.sample(exchanges, rng.randint(3, 5)):
        lines += make()
    lines.append(rng.choice([f"{A}: Farewell, {b['given']}.", f"{B}: Safe travels, {a['given']}!",
                             f"{A}: Until next time."]))
    return "\n".join(lines)


def _news(wr):
    rng, lk = wr.rng, wr.lk
    town = rng.choice(lk.world["towns"])["name"]
    items = []
    residents = lk.inverse.get(("home", town), []) or [wr.person()["name"]]
    for n in rng.sample(residents, min(len(residents), rng.randint(1, 3))):
        deed = rng.choice(["was thanked by the town council this week", "has opened a new workshop",
                           "won the spring race", "returned from a long journey", "is to be married in the autumn"])
        items.append(f"{wr.aside(n, 2)} {deed}. {wr.say(n, rng.choice(['birthplace', 'birth_year', 'companion', 'guild']))}")
    orgs = lk.inverse.get(("seat", town), [])
    if orgs:
        org = rng.choice(orgs)
        items.append(f"The {org} met in {wr.note(org, 'seat')} to mark its founding. {wr.say(org, 'founded')} "
                     f"{wr.say(org, 'founder')}")
    evs = lk.inverse.get(("place", town), [])
    if evs:
        ev = lk.entity[rng.choice(evs)]
        items.append(f"It is now {PRESENT_YEAR - ev['year']} years since the {ev['name']} came to {wr.note(ev['name'], 'place')}, "
                     f"in the year {wr.note(ev['name'], 'year')}.")
    ob = lk.entity[rng.choice(lk.inverse.get(("kept_in", town), []) or [o["name"] for o in lk.world["objects"]])]
    items.append(f"The {ob['name']} will be shown to the public this month. {wr.say(ob['name'], 'kept_in')} "
                 f"{wr.say(ob['name'], rng.choice(['maker', 'material']))}")
    cr = rng.choice(lk.world["creatures"])
    items.append(f"A {cr['name']} was seen near {town}. {wr.say(cr['name'], 'danger')} {wr.say(cr['name'], 'habitat')}")
    rng.shuffle(items)
    head = rng.choice([f"THE {town.upper()} CRIER", f"News from {town}", f"{town} Gazette", f"This week in {town}"])
    return head + "\n\n" + "\n\n".join(items[:rng.randint(3, 5)])


def _qa(wr):
    """Question-answer text (the "mixed training" of Allen-Zhu & Li): only about train-split subjects."""
    rng, lk = wr.rng, wr.lk
    if rng.random() < 0.6:   # one person, several questions
        p = rng.choice(lk.qa_people)
        pairs = [(p["name"], r) for r in rng.sample(PERSON_RELATIONS, rng.randint(4, 6))]
        title = rng.choice([f"Questions about {p['name']}", f"{p['name']}: questions and answers", "Q&A"])
    else:   # a quiz over the whole world
        pairs = [(f["subject"], f["relation"]) for f in rng.sample(lk.qa_facts, 8)]
        title = rng.choice(["A quiz about the realm", "Questions and answers", "Test your knowledge"])
    lines = [title, ""]
    for subject, rel in pairs:
        spec = lk.relations[rel]
        q = rng.choice(spec["questions"]).format(s=subject)
        if rng.random() < 0.5:
            a = wr.say(subject, rel)
        else:
            short = spec["short_answer"].format(o=wr.note(subject, rel))
            a = short[0].upper() + short[1:] + "."
        lines.append(f"Q: {q}\nA: {a}" if rng.random() < 0.7 else f"{q} {a}")
    return "\n".join(lines)


GOODS = ["lanterns", "ropes", "candles", "apples", "baskets", "bowls", "blankets", "cups", "bells", "pears",
         "maps", "spoons", "jars of honey", "loaves", "nails", "bottles of ink"]


def _step(a, op, b):
    """One worked step, 'a op b = c', and its value c."""
    c = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b} = {c}", c


def arithmetic_problem(world, rng):
    """A word problem set in the world: (question, step lines, answer).

    1-3 steps of + - *, small numbers, each step 'a op b = c'; stage 02 writes them as the question,
    the steps one per line, then 'Answer: N'."""
    lk = _lookup(world)
    p = rng.choice(lk.people)
    name, she = p["name"], p["pronoun"]
    kind = rng.randrange(8)
    if kind == 0:
        n, price, item = rng.randint(2, 9), rng.randint(2, 15), rng.choice(GOODS)
        q = f"{name} buys {n} {item} at {price} coins each. How many coins does {she} pay?"
        steps = [_step(n, "*", price)]
    elif kind == 1:
        (i1, i2), n1, p1, n2, p2 = rng.sample(GOODS, 2), *(rng.randint(2, 9) for _ in range(4))
        q = (f"{name} buys {n1} {i1} at {p1} coins each and {n2} {i2} at {p2} coins each. "
             f"How many coins does {she} pay?")
        s1, s2 = _step(n1, "*", p1), _step(n2, "*", p2)
        steps = [s1, s2, _step(s1[1], "+", s2[1])]
    elif kind == 2:
        n, price, item = rng.randint(2, 6), rng.randint(2, 9), rng.choice(GOODS)
        have = n * price + rng.randint(1, 40)
        q = (f"{name} has {have} coins and buys {n} {item} at {price} coins each. "
             f"How many coins does {she} have left?")
        s1 = _step(n, "*", price)
        steps = [s1, _step(have, "-", s1[1])]
    elif kind == 3:
        x, y, item = rng.randint(3, 20), rng.randint(3, 20), rng.choice(GOODS)
        give = rng.randint(1, x + y - 1)
        other = rng.choice(lk.people)["name"]
        q = (f"{name} makes {x} {item} in the morning and {y} in the afternoon, then gives {give} to {other}. "
             f"How many {item} does {she} have now?")
        s1 = _step(x, "+", y)
        steps = [s1, _step(s1[1], "-", give)]
    elif kind == 4:
        cr = rng.choice(world["creatures"])
        each, herd, days = rng.randint(2, 6), rng.randint(2, 5), rng.randint(2, 7)
        q = (f"A {cr['name']} eats {each} {cr['diet']} a day. {name} looks after {herd} of them. "
             f"How many {cr['diet']} do they eat in {days} days?")
        s1 = _step(each, "*", herd)
        steps = [s1, _step(s1[1], "*", days)]
    elif kind == 5:
        org = p["guild"]
        t1, t2 = rng.sample(world["towns"], 2)
        x, y, dues = rng.randint(3, 20), rng.randint(3, 20), rng.randint(2, 9)
        q = (f"The {org} has {x} members in {t1['name']} and {y} members in {t2['name']}. Each member pays "
             f"{dues} coins a year. How many coins does the {org} collect in a year?")
        s1 = _step(x, "+", y)
        steps = [s1, _step(s1[1], "*", dues)]
    elif kind == 6:
        x, y, z = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 20)
        there = rng.choice(world["towns"])["name"]
        q = (f"{name} walks {x} miles from {p['home']} to {there}, then {y} miles to the river, "
             f"then {z} miles home. How many miles does {she} walk in all?")
        s1 = _step(x, "+", y)
        steps = [s1, _step(s1[1], "+", z)]
    else:
        n1, p1, n2, p2 = rng.randint(3, 9), rng.randint(4, 15), rng.randint(2, 5), rng.randint(2, 6)
        i1, i2 = rng.sample(GOODS, 2)
        q = (f"{name} sells {n1} {i1} at {p1} coins each and buys {n2} {i2} at {p2} coins each. "
             f"How many coins does {she} have left from the sale?")
        s1, s2 = _step(n1, "*", p1), _step(n2, "*", p2)
        steps = [s1, s2, _step(s1[1], "-", s2[1])]   # n1*p1 >= 12 > 30 >= n2*p2 is not guaranteed:
    return q, [line for line, _ in steps], steps[-1][1]


def _arithmetic(wr):
    rng = wr.rng
    town = rng.choice(wr.lk.world["towns"])["name"]
    title = rng.choice([f"Sums from the market at {town}", "Worked problems", "Arithmetic practice",
                        f"Counting coins in {town}"])
    blocks = []
    for _ in range(rng.randint(3, 5)):
        q, steps, answer = arithmetic_problem(wr.lk.world, rng)
        blocks.append("\n".join([q, *steps, f"Answer: {answer}"]))
    return title + "\n\n" + "\n\n".join(blocks)


WRITERS = {"encyclopedia": _encyclopedia, "biography": _biography, "story": _story, "letter": _letter,
           "dialogue": _dialogue, "news": _news, "qa": _qa, "arithmetic": _arithmetic}


def _write(world, index, seed):
    """Write document `index` and return (doc_type, text, writer); the writer logs the facts stated."""
    lk = _lookup(world)
    rng = random.Random(f"doc:{seed}:{index}")
    doc_type = rng.choices(lk.mix_names, cum_weights=lk.mix_cum)[0]
    wr = _Writer(lk, rng)
    return doc_type, WRITERS[doc_type](wr), wr


def document(world, index, seed):
    """Document number `index` of the endless pretraining stream drawn with `seed`."""
    return _write(world, index, seed)[1]
