"""Generate the bundled extraction dataset (seeded, byte-for-byte reproducible).

Task: a short English sentence about a person -> the exact JSON
{"name": ..., "age": ..., "city": ..., "year": ..., "job": ...} (fixed key
order, ", " and ": " separators). A small instruct model does not produce this
exact format out of the box; a short LoRA SFT run learns it.

Generalization: eval rows use first and last names that never occur in train,
and half of them use sentence templates that train never sees.

Preference pairs for train.dpo (data/prefs_{train,eval}.jsonl) reuse those rows: `chosen` is the
correct JSON, `rejected` a plausible wrong one (a wrong year, a wrong city, or city and job swapped).

    python data/make_dataset.py                  # writes data/{extract,prefs}_{train,eval}.jsonl
    python data/make_dataset.py --out-dir /tmp/x # same bytes elsewhere
"""

from __future__ import annotations

import argparse
import json
import os
import random

INSTRUCTION = "Extract name, age, city, year and job as JSON."
KEYS = ("name", "age", "city", "year", "job")

FIRST_NAMES = [
  "Maria",
  "James",
  "Aisha",
  "Kenji",
  "Sofia",
  "Liam",
  "Elena",
  "Omar",
  "Chloe",
  "Mateo",
  "Priya",
  "Lucas",
  "Hannah",
  "Diego",
  "Yuki",
  "Noah",
  "Fatima",
  "Ethan",
  "Ingrid",
  "Pablo",
  "Grace",
  "Ivan",
  "Leila",
  "Oscar",
  "Nora",
  "Samuel",
  "Zara",
  "Felix",
  "Amara",
  "Hugo",
  "Clara",
  "Rahul",
  "Mia",
  "Tomas",
  "Lena",
  "Victor",
  "Rosa",
  "Daniel",
  "Anika",
  "Marco",
]
LAST_NAMES = [
  "Lopez",
  "Smith",
  "Khan",
  "Tanaka",
  "Rossi",
  "Murphy",
  "Novak",
  "Haddad",
  "Dubois",
  "Garcia",
  "Patel",
  "Silva",
  "Becker",
  "Morales",
  "Sato",
  "Brown",
  "Ali",
  "Walker",
  "Larsen",
  "Ruiz",
  "Kim",
  "Petrov",
  "Nasser",
  "Olsen",
  "Weber",
  "Cohen",
  "Mensah",
  "Fischer",
  "Okafor",
  "Moreau",
]
# Held out: only eval rows use these.
EVAL_FIRST_NAMES = [
  "Beatriz",
  "Kwame",
  "Astrid",
  "Farid",
  "Mei",
  "Gustavo",
  "Signe",
  "Tariq",
  "Lucia",
  "Arjun",
]
EVAL_LAST_NAMES = [
  "Castillo",
  "Lindqvist",
  "Oyelaran",
  "Hashemi",
  "Nakamura",
  "Kowalski",
  "Varga",
  "Duarte",
]

CITIES = [
  "Lyon",
  "Berlin",
  "Madrid",
  "Osaka",
  "Toronto",
  "Nairobi",
  "Lisbon",
  "Denver",
  "Milan",
  "Oslo",
  "Seoul",
  "Dublin",
  "Austin",
  "Porto",
  "Krakow",
  "Vienna",
  "Chicago",
  "Sydney",
  "Lima",
  "Prague",
  "Boston",
  "Munich",
  "Cairo",
  "Quito",
  "Hamburg",
  "Seattle",
  "Valencia",
  "Geneva",
  "Leeds",
  "Perth",
]
JOBS = [
  "nurse",
  "teacher",
  "chef",
  "pilot",
  "lawyer",
  "baker",
  "architect",
  "plumber",
  "journalist",
  "dentist",
  "engineer",
  "librarian",
  "photographer",
  "electrician",
  "pharmacist",
  "accountant",
  "carpenter",
  "firefighter",
  "translator",
  "gardener",
  "mechanic",
  "designer",
  "veterinarian",
  "cashier",
  "programmer",
]

# Placeholders: {name} {age} {city} {year} {job}. Varied field order on purpose.
TRAIN_TEMPLATES = [
  "{name}, {age}, moved to {city} in {year} to work as a {job}.",
  "In {year}, {name} ({age}) started a new job as a {job} in {city}.",
  "{name} is a {age}-year-old {job} who has lived in {city} since {year}.",
  "Since {year}, the {job} {name}, aged {age}, has been based in {city}.",
  "{city} became home to {name} in {year}; the {age}-year-old works as a {job}.",
  "At {age}, {name} took a {job} position in {city} in {year}.",
  "Our new {job} in {city} is {name}, {age}, who joined in {year}.",
  "{name} ({job}, {age}) relocated to {city} back in {year}.",
  "Profile: {name}, age {age}. Job: {job}. Moved to {city} in {year}.",
  "The {age}-year-old {name} has worked in {city} as a {job} since {year}.",
  "In {city}, {name} has been a {job} since {year}. {name} is {age}.",
  "{year} was the year {name}, then a {job}, arrived in {city}. Age now: {age}.",
  "Meet {name}: {age} years old, {job}, living in {city} since {year}.",
  "{name} left home in {year} for {city}, where the {age}-year-old is a {job}.",
  "A {job} from {city}, {name} ({age}) began the role in {year}.",
  "Working as a {job} in {city} since {year}, {name} turned {age} this spring.",
  "{name}, a {job} aged {age}, settled in {city} in {year}.",
  "Record: {city}, {year}. {name}, {age}, {job}.",
]
EVAL_TEMPLATES = [
  "After moving to {city} in {year}, {name} found work as a {job}; {name} is now {age}.",
  "{name} is {age} and works as a {job}. The move to {city} happened in {year}.",
  "Hired in {year} as a {job} in {city}: {name}, {age} years of age.",
  "Everyone in {city} knows {name}, the {age}-year-old {job} who came in {year}.",
]


def _row(rng: random.Random, first_names, last_names, templates) -> dict:
  age = rng.randint(19, 78)
  fields = {
    "name": f"{rng.choice(first_names)} {rng.choice(last_names)}",
    "age": age,
    "city": rng.choice(CITIES),
    # Keep the story plausible: nobody started a job before turning 18 (as of 2024).
    "year": rng.randint(max(1990, 2024 - age + 18), 2024),
    "job": rng.choice(JOBS),
  }
  sentence = rng.choice(templates).format(**fields)
  # Templates like "a {job}" would read "a engineer"; fix the article so the text is natural.
  for job in JOBS:
    if job[0] in "aeiou":
      sentence = sentence.replace(f" a {job}", f" an {job}").replace(f"A {job}", f"An {job}")
  answer = json.dumps({k: fields[k] for k in KEYS})
  # The instruction goes in a system message: templates like SmolLM2's otherwise inject a
  # ~20-token default system prompt, which would make every row longer for nothing.
  return {
    "messages": [
      {"role": "system", "content": INSTRUCTION},
      {"role": "user", "content": sentence},
      {"role": "assistant", "content": answer},
    ]
  }


def generate(
  seed: int = 0, n_train: int = 1500, n_eval: int = 100
) -> tuple[list[dict], list[dict]]:
  """(train_rows, eval_rows); eval names are held out, half its templates too."""
  rng = random.Random(seed)
  train, seen = [], set()
  while len(train) < n_train:
    row = _row(rng, FIRST_NAMES, LAST_NAMES, TRAIN_TEMPLATES)
    key = row["messages"][1]["content"]
    if key not in seen:  # duplicates would only reweight the data
      seen.add(key)
      train.append(row)
  eval_rows = []
  for i in range(n_eval):
    templates = EVAL_TEMPLATES if i % 2 else TRAIN_TEMPLATES
    eval_rows.append(_row(rng, EVAL_FIRST_NAMES, EVAL_LAST_NAMES, templates))
  return train, eval_rows


def _wrong_answer(rng: random.Random, fields: dict) -> tuple[dict, str]:
  """A plausible wrong extraction of `fields` and how it is wrong: a wrong year, a wrong city,
  or two fields' values swapped (city and job)."""
  kind = rng.choice(("wrong_year", "wrong_city", "swapped_city_job"))
  wrong = dict(fields)
  if kind == "wrong_year":
    wrong["year"] = fields["year"] + rng.choice([-1, 1]) * rng.randint(1, 6)
  elif kind == "wrong_city":
    wrong["city"] = rng.choice([c for c in CITIES if c != fields["city"]])
  else:
    wrong["city"], wrong["job"] = fields["job"], fields["city"]
  return wrong, kind


def preference_pair(rng: random.Random, row: dict) -> dict:
  """An SFT row -> {'prompt': [system, user], 'chosen': [correct JSON], 'rejected': [wrong JSON]}."""
  *prompt, answer = row["messages"]
  fields = json.loads(answer["content"])
  wrong, _ = _wrong_answer(rng, fields)
  return {
    "prompt": prompt,
    "chosen": [answer],
    "rejected": [{"role": "assistant", "content": json.dumps({k: wrong[k] for k in KEYS})}],
  }


def generate_preferences(
  seed: int = 0, n_train: int = 400, n_eval: int = 48
) -> tuple[list[dict], list[dict]]:
  """(train_pairs, eval_pairs) for train.dpo, built on generate()'s rows (same held-out eval
  names and templates) with their own seeded rng, so the SFT files are unchanged."""
  train, eval_rows = generate(seed)
  rng = random.Random(f"preferences-{seed}")
  return (
    [preference_pair(rng, row) for row in train[:n_train]],
    [preference_pair(rng, row) for row in eval_rows[:n_eval]],
  )


def write_jsonl(rows: list[dict], path: str) -> None:
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=True) + "\n")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--n-train", type=int, default=1500)
  parser.add_argument("--n-eval", type=int, default=100)
  args = parser.parse_args(argv)
  train, eval_rows = generate(args.seed, args.n_train, args.n_eval)
  os.makedirs(args.out_dir, exist_ok=True)
  prefs_train, prefs_eval = generate_preferences(args.seed)
  for name, rows in (
    ("extract_train.jsonl", train),
    ("extract_eval.jsonl", eval_rows),
    ("prefs_train.jsonl", prefs_train),
    ("prefs_eval.jsonl", prefs_eval),
  ):
    path = os.path.join(args.out_dir, name)
    write_jsonl(rows, path)
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
  main()
