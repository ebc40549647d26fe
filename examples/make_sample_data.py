"""Writes examples/data/{train,dev}.jsonl: raykit's own small sample set (public domain).

Each topic has a question, an answer (the positive), and a near miss that shares words with the
question but does not answer it (a hard negative). Every group also gets answers to other
questions as easy negatives. Run: python examples/make_sample_data.py
"""

import json
import random
from pathlib import Path

TOPICS = [
    (
        "How long should I boil an egg for a soft yolk?",
        "For a soft, runny yolk, lower the egg into boiling water and cook it for six minutes, then cool it under cold water.",
        "Eggs keep for three to five weeks in the fridge; store them in their carton away from strong smells.",
    ),
    (
        "Why does bread dough need to rest?",
        "Resting lets the gluten relax and gives the yeast time to produce gas, so the dough rises and is easier to shape.",
        "Bread goes stale faster in the fridge than at room temperature because the starch recrystallises.",
    ),
    (
        "How do I keep cut avocado from turning brown?",
        "Brush the cut surface with lemon or lime juice and wrap it tightly; the acid and the lack of air slow the browning.",
        "An avocado is ripe when it yields slightly to gentle pressure near the stem.",
    ),
    (
        "What is the difference between baking soda and baking powder?",
        "Baking soda is pure sodium bicarbonate and needs an acid in the recipe; baking powder already contains the acid.",
        "Baking at a high altitude usually needs a little more liquid and a slightly hotter oven.",
    ),
    (
        "How often should I water a cactus?",
        "Water a cactus deeply only when the soil has dried out completely, about every two to four weeks in summer and rarely in winter.",
        "Cactus spines are modified leaves that reduce water loss and protect the plant from animals.",
    ),
    (
        "When is the best time to plant tulip bulbs?",
        "Plant tulip bulbs in autumn, a few weeks before the ground freezes, so their roots can grow before winter.",
        "Tulips were so valuable in the Netherlands in the 1630s that single bulbs sold for the price of a house.",
    ),
    (
        "Why are the leaves of my tomato plant turning yellow?",
        "Yellow lower leaves on tomatoes usually mean too much water or a lack of nitrogen; check drainage and feed the plant.",
        "Tomatoes are botanically fruits, although they are cooked and eaten as vegetables.",
    ),
    (
        "How do I get rid of aphids without chemicals?",
        "Spray aphids off with a strong jet of water, or wipe them with soapy water; ladybirds also eat them in large numbers.",
        "Aphids reproduce without mating in summer, so a single insect can start a whole colony.",
    ),
    (
        "How can I fall asleep faster?",
        "Keep a regular bedtime, avoid screens and caffeine in the evening, and keep the bedroom cool, dark and quiet.",
        "Adults sleep in cycles of about ninety minutes, moving between light, deep and REM sleep.",
    ),
    (
        "How much water should an adult drink each day?",
        "Most adults need about two to three litres of fluid a day, more in hot weather or with exercise; food supplies part of it.",
        "Sea water is too salty to drink because the kidneys need more water to remove the salt than the drink provides.",
    ),
    (
        "What should I do for a minor burn?",
        "Cool a minor burn under cool running water for twenty minutes, then cover it loosely with cling film or a clean dressing.",
        "Sunburn is caused by ultraviolet light damaging the DNA in skin cells.",
    ),
    (
        "How do I stop a nosebleed?",
        "Sit up, lean forward and pinch the soft part of the nose for ten to fifteen minutes while breathing through the mouth.",
        "The nose warms and moistens the air before it reaches the lungs.",
    ),
    (
        "How do I renew my passport?",
        "Fill in the renewal form online or at the post office, attach a recent photo and your old passport, and pay the fee.",
        "A passport photo must show a neutral expression and a plain light background.",
    ),
    (
        "What is the cheapest way to travel between European cities?",
        "Long-distance buses and early-booked trains are usually the cheapest way between European cities; budget flights add baggage fees.",
        "Many European cities have old town centres that are closed to cars.",
    ),
    (
        "Do I need a visa to visit Japan as a tourist?",
        "Citizens of many countries can visit Japan for up to ninety days without a visa; check the list of visa-exempt nations before you travel.",
        "Japan's high-speed rail network, the Shinkansen, opened in 1964.",
    ),
    (
        "How can I avoid jet lag?",
        "Shift your sleep towards the destination's time a few days before flying, get daylight on arrival, and avoid long naps.",
        "Jet streams are fast winds high in the atmosphere that can shorten eastbound flights.",
    ),
    (
        "How do I change a flat tyre?",
        "Loosen the wheel nuts, jack up the car, remove the wheel, fit the spare, tighten the nuts in a star pattern and lower the car.",
        "Tyre pressure should be checked monthly when the tyres are cold.",
    ),
    (
        "Why is my car battery draining overnight?",
        "A battery that drains overnight usually has a parasitic load, such as a light left on or a faulty module, or is simply old.",
        "Electric cars use large lithium-ion batteries instead of a petrol engine.",
    ),
    (
        "How often should I change my engine oil?",
        "Most modern cars need an oil change every 10,000 to 15,000 kilometres or once a year; the handbook gives the exact interval.",
        "Olive oil has a lower smoke point than most refined vegetable oils.",
    ),
    (
        "How do I reset my home Wi-Fi router?",
        "Hold the reset button on the back of the router for about ten seconds until the lights flash; it returns to factory settings.",
        "Wi-Fi signals travel less well through thick walls and metal than through open space.",
    ),
    (
        "What is a good way to create a strong password?",
        "Use a long passphrase of several random words, a different one for every site, and keep them in a password manager.",
        "The first computer passwords were used at MIT in the 1960s on time-sharing systems.",
    ),
    (
        "How do I take a screenshot on a laptop?",
        "On Windows press Windows+Shift+S to select an area; on a Mac press Command+Shift+4 and drag to capture part of the screen.",
        "Laptop screens are usually LCD or OLED panels lit from behind or by the pixels themselves.",
    ),
    (
        "Why is my computer running slowly?",
        "A slow computer usually has too many programs starting at boot, a nearly full disk, or too little memory for what is open.",
        "The first electronic computers filled whole rooms and used thousands of vacuum tubes.",
    ),
    (
        "What does a cross-encoder reranker do?",
        "A cross-encoder reads the query and a passage together and outputs one relevance score, which is used to reorder retrieved results.",
        "An encoder converts text into token ids before a neural network processes it.",
    ),
    (
        "What is Ray used for in machine learning?",
        "Ray is a framework for running Python across a cluster; its libraries handle distributed data loading, training, tuning and serving.",
        "A ray of light travels in a straight line until it is reflected or refracted.",
    ),
    (
        "What is gradient accumulation?",
        "Gradient accumulation sums the gradients of several small batches before one optimizer step, simulating a larger batch in less memory.",
        "A gradient in mathematics is the vector of partial derivatives of a function.",
    ),
    (
        "What is mixed precision training?",
        "Mixed precision runs most operations in 16-bit floats for speed and memory, while keeping master weights and sensitive sums in 32-bit.",
        "Precision and recall measure how many retrieved items are relevant and how many relevant items are retrieved.",
    ),
    (
        "How do I learn to swim as an adult?",
        "Start in shallow water, practise floating and breathing out under water, then take lessons that build one stroke at a time.",
        "Swimming pools are usually kept between 25 and 28 degrees Celsius.",
    ),
    (
        "How many days a week should I run?",
        "Beginners do well with three runs a week and a rest day between them; experienced runners may run five or six days.",
        "The marathon distance of 42.195 kilometres was fixed at the 1908 London Olympics.",
    ),
    (
        "How do I stretch a tight hamstring?",
        "Lie on your back, loop a towel around one foot and gently raise the straight leg until you feel a stretch; hold for thirty seconds.",
        "Hamstring injuries are common in sprinters because the muscle works hard when the leg extends.",
    ),
    (
        "How do I remove a red wine stain from a carpet?",
        "Blot the wine with a cloth, pour on cold water or soda water, blot again, then treat with a paste of baking soda and vacuum when dry.",
        "Red wine gets its colour from the skins of the grapes during fermentation.",
    ),
    (
        "How can I get rid of mould in the bathroom?",
        "Scrub mould with diluted bleach or vinegar, rinse, and keep the room ventilated so that surfaces dry after every shower.",
        "Penicillin was discovered in a mould that contaminated a bacterial culture.",
    ),
    (
        "How do I unclog a kitchen sink?",
        "Pour boiling water down the drain, then use a plunger; if that fails, open the trap under the sink and clear it by hand.",
        "Kitchen sinks are usually made of stainless steel, ceramic or composite stone.",
    ),
    (
        "How do I save money on groceries?",
        "Plan meals for the week, shop with a list, buy store brands and seasonal produce, and cook larger batches to use leftovers.",
        "The first supermarkets with self-service shelves opened in the United States in 1916.",
    ),
    (
        "What is an emergency fund and how big should it be?",
        "An emergency fund is cash set aside for unexpected costs such as job loss or repairs; three to six months of expenses is common advice.",
        "Emergency services can be reached on 112 anywhere in the European Union.",
    ),
    (
        "How does compound interest work?",
        "Compound interest is paid on the original sum and on the interest already earned, so savings grow faster the longer they stay invested.",
        "Interest rates are set by central banks to control inflation.",
    ),
    (
        "How do I write a good cover letter?",
        "Address the hiring manager, show in a few paragraphs how your experience matches the job, and end with a clear request for an interview.",
        "A curriculum vitae lists education and work history, usually in reverse order.",
    ),
    (
        "How should I prepare for a job interview?",
        "Research the company, practise answers to common questions with concrete examples, prepare questions of your own and plan your route.",
        "Many companies now hold the first interview by video call.",
    ),
    (
        "Why do cats purr?",
        "Cats purr when content but also when stressed or in pain; the vibration may soothe them and even help heal bones and tissue.",
        "Cats sleep between twelve and sixteen hours a day.",
    ),
    (
        "How often should I walk my dog?",
        "Most dogs need at least two walks a day, thirty minutes to two hours in total depending on breed, age and health.",
        "Dogs were domesticated from wolves more than fifteen thousand years ago.",
    ),
    (
        "How do I introduce a new cat to my home?",
        "Keep the new cat in one quiet room with food, water and a litter tray for a few days, then let it explore the house gradually.",
        "Cats have a reflective layer behind the retina that helps them see in dim light.",
    ),
    (
        "Why is the sky blue?",
        "Sunlight is scattered by air molecules, and blue light is scattered much more than red, so blue reaches our eyes from every direction.",
        "The sky at night is dark because the universe is expanding and is not infinitely old.",
    ),
    (
        "What causes the seasons?",
        "The seasons come from the tilt of the Earth's axis: each hemisphere gets more direct sunlight for part of the year as the Earth orbits.",
        "The Earth is closest to the Sun in early January, during the northern winter.",
    ),
    (
        "How do vaccines work?",
        "A vaccine shows the immune system a harmless part or form of a germ, so it learns to recognise it and responds quickly to a real infection.",
        "Vaccines are stored in refrigerators between two and eight degrees Celsius.",
    ),
    (
        "Why do leaves change colour in autumn?",
        "As days shorten, trees stop making green chlorophyll; it breaks down and reveals yellow and orange pigments, while red ones are newly made.",
        "Evergreen trees keep their needles through winter thanks to a waxy coating.",
    ),
    (
        "How do I start learning a new language?",
        "Learn the most common words first, practise a little every day, listen to native speakers, and speak from the start even with mistakes.",
        "There are about seven thousand languages spoken in the world today.",
    ),
    (
        "How can I improve my handwriting?",
        "Hold the pen loosely, write slowly with consistent letter size and slant, and practise with lined paper for a few minutes daily.",
        "The ballpoint pen was patented by László Bíró in 1938.",
    ),
    (
        "How do I tune a guitar without a tuner?",
        "Tune the low E string to a reference, then fret it at the fifth fret to tune the A string, and repeat up the neck (fourth fret for B).",
        "Electric guitars use magnetic pickups to turn string vibrations into an electric signal.",
    ),
    (
        "How do I paint a room quickly and neatly?",
        "Clear and cover the room, tape the edges, cut in along corners with a brush, then roll the walls in overlapping W shapes.",
        "Oil paint takes days to dry, which lets painters blend colours on the canvas.",
    ),
    (
        "How do I fix a squeaky door hinge?",
        "Lift the hinge pin, wipe it, coat it with petroleum jelly or a light oil, put it back and swing the door a few times.",
        "Revolving doors save energy by keeping warm air inside buildings.",
    ),
    (
        "How do I make cold brew coffee?",
        "Mix coarsely ground coffee with cold water at about one to eight, steep it in the fridge for twelve to eighteen hours, then strain.",
        "Coffee beans are the seeds of a cherry-like fruit that grows in the tropics.",
    ),
    (
        "How do I keep herbs fresh longer?",
        "Stand soft herbs like basil in a glass of water at room temperature; wrap hardy herbs in a damp paper towel and refrigerate them.",
        "Herbs such as rosemary and thyme grow well in dry, sunny spots.",
    ),
]


def main() -> None:
    rng = random.Random(7)
    groups = []
    for index, (query, answer, near_miss) in enumerate(TOPICS):
        others = [t[1] for j, t in enumerate(TOPICS) if j != index]
        groups.append({"query": query, "pos": [answer], "neg": [near_miss, *rng.sample(others, 3)]})
    rng.shuffle(groups)
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    for name, rows in (("train", groups[:40]), ("dev", groups[40:])):
        with open(out / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{out / name}.jsonl: {len(rows)} groups")
    # The dev groups again as a first-stage run to rescore: one (query, passage) pair per line.
    with open(out / "score_pairs.jsonl", "w") as f:
        for q, row in enumerate(groups[40:]):
            for d, passage in enumerate(row["pos"] + row["neg"]):
                pair = {
                    "query_id": f"q{q}",
                    "doc_id": f"q{q}-d{d}",
                    "query": row["query"],
                    "passage": passage,
                }
                f.write(json.dumps(pair) + "\n")
    print(f"{out / 'score_pairs.jsonl'}: {len(groups[40:])} queries")
    write_beir(out / "beir", groups[40:])


def write_beir(out: Path, dev: list[dict]) -> None:
    """The dev questions as a BEIR-layout dataset: every topic's answer and near miss in one
    corpus, the dev questions as queries, their answers as qrels (relevance 1)."""
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    doc_ids = {}
    with open(out / "corpus.jsonl", "w") as f:
        for index, (_, answer, near_miss) in enumerate(TOPICS):
            for kind, text in (("a", answer), ("n", near_miss)):
                doc_ids[text] = f"doc{index}{kind}"
                f.write(json.dumps({"_id": doc_ids[text], "title": "", "text": text}) + "\n")
    with open(out / "queries.jsonl", "w") as f, open(out / "qrels" / "test.tsv", "w") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for q, row in enumerate(dev):
            f.write(json.dumps({"_id": f"q{q}", "text": row["query"]}) + "\n")
            qrels.write(f"q{q}\t{doc_ids[row['pos'][0]]}\t1\n")
    print(f"{out}: {len(doc_ids)} documents, {len(dev)} queries")


if __name__ == "__main__":
    main()
