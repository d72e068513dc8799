"""Queries: the five prompts, the paper's CSV schema, bad input, and the query builder."""

import pandas as pd
import pytest

from latent_hops.queries import (
    DatasetError,
    TwoHopQuery,
    e1_span_in_composition,
    iter_queries,
    load_dataset,
    queries_to_table,
    save_dataset,
    write_paper_csv,
)
from latent_hops.query_builder import BuilderConfig, build_queries

IMAGINE = TwoHopQuery(
    id="1", e1_label="Imagine", e2_label="John Lennon", e3_label="Yoko Ono",
    r1_template="the performer of {}", r2_template="the spouse of {}",
    e1_aliases=("Imagine (song)",), e2_aliases=("Lennon", "John Winston Lennon"), e3_aliases=("Ono",),
)

# Two rows in exactly the official two_hop.csv schema (aliases as Python-list literals).
PAPER_CSV = '''id,e1,r1,e2,r2,e3,e1_label,e2_label,e3_label,e1_aliases,e2_aliases,e3_aliases,e1_type,e2_type,e3_type,r1_type,r2_type,e1_popularity,e2_popularity,e3_popularity,r1_template,r2_template,source_prompt
7,Q1,P175,Q1203,P26,Q117012,Imagine,John Lennon,Yoko Ono,"['Imagine', ""Imagine (Lennon's song)""]","['John Lennon', 'John Winston Ono Lennon']",['Yoko Ono'],song,human,human,performer,spouse,10,100,50,the performer of {},the spouse of {},the spouse of the performer of Imagine is
8,Q90,P17,Q142,P36,Q90,Paris,France,Paris,['Paris'],"['France', 'French Republic']",['Paris'],city,country,city,country,capital,1,2,3,the country of {},the capital of {},the capital of the country of Paris is
'''


def test_five_prompts_exact():
    assert IMAGINE.prompts() == {
        "first_hop": "the performer of Imagine is",
        "second_hop": "the spouse of John Lennon is",
        "composition": "the spouse of the performer of Imagine is",
        "entity_shortcut": "the spouse of Imagine is",
        "relation_shortcut": "the spouse of the performer of is",
    }
    assert IMAGINE.names("e2") == ("John Lennon", "Lennon", "John Winston Lennon")


def test_templates_are_data_driven():
    q = TwoHopQuery(id="g", e1_label="Imagine", e2_label="John Lennon", e3_label="Yoko Ono",
                    r1_template="{}'s performer", r2_template="{}'s spouse")
    assert q.prompts(suffix=" ist")["composition"] == "Imagine's performer's spouse ist"
    assert e1_span_in_composition(q, " ist") == (0, 7)


def test_paper_csv_loads(tmp_path):
    path = tmp_path / "two_hop.csv"
    path.write_text(PAPER_CSV)
    table = load_dataset(path)
    assert list(table["id"]) == ["7", "8"]
    assert table.loc[0, "e1_aliases"] == ["Imagine", "Imagine (Lennon's song)"]
    q = iter_queries(table)[0]
    assert q.composition_prompt() == "the spouse of the performer of Imagine is" and q.split == "all"
    assert q.e2_type == "human" and q.r2_type == "spouse"


def test_parquet_and_jsonl_round_trip(tmp_path):
    table = queries_to_table([IMAGINE])
    back = load_dataset(save_dataset(table, tmp_path / "q.parquet"))
    pd.testing.assert_frame_equal(back, load_dataset(write_paper_csv(table, tmp_path / "q.csv")))
    table.to_json(tmp_path / "q.jsonl", orient="records", lines=True)
    pd.testing.assert_frame_equal(back, load_dataset(tmp_path / "q.jsonl"))
    assert iter_queries(back)[0] == IMAGINE


@pytest.mark.parametrize("name", ["q.parquet", "q.csv", "q.jsonl", "Q.PQ"])
def test_save_dataset_writes_what_its_name_says(tmp_path, name):
    """Each format ``save_dataset`` writes loads back as the same table (it once wrote Parquet
    bytes under any name, which a .csv loader cannot read)."""
    table = load_dataset("toy").iloc[:20]
    pd.testing.assert_frame_equal(load_dataset(save_dataset(table, tmp_path / name)), table)


def test_save_dataset_refuses_a_name_it_cannot_load(tmp_path):
    with pytest.raises(DatasetError, match="unknown format '.txt'"):
        save_dataset(load_dataset("toy").iloc[:2], tmp_path / "q.txt")
    assert not (tmp_path / "q.txt").exists()


def test_missing_columns_listed_in_one_error(tmp_path):
    path = tmp_path / "bad.csv"
    pd.read_csv(pd.io.common.StringIO(PAPER_CSV)).drop(columns=["e3_aliases", "r2_template"]).to_csv(path, index=False)
    with pytest.raises(DatasetError, match="missing required columns: e3_aliases, r2_template"):
        load_dataset(path)


def test_malformed_alias_names_row(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(PAPER_CSV.replace("['Yoko Ono']", "\"['Yoko Ono'\""))
    with pytest.raises(DatasetError, match="row id 7: column e3_aliases"):
        load_dataset(path)


def test_duplicate_ids(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text(PAPER_CSV.replace("\n8,", "\n7,"))
    with pytest.raises(DatasetError, match="duplicate query ids: 7"):
        load_dataset(path)


def test_empty_dataset_and_missing_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text(PAPER_CSV.splitlines()[0] + "\n")
    with pytest.raises(DatasetError, match="empty"):
        load_dataset(path)
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "nope.csv")


def test_e1_missing_from_source_prompt_is_a_reason():
    q = TwoHopQuery(**{**IMAGINE.__dict__, "source_prompt": "the spouse of the singer of that song is"})
    assert "does not occur" in e1_span_in_composition(q)
    twice = TwoHopQuery(**{**IMAGINE.__dict__, "source_prompt": "Imagine: the spouse of the performer of Imagine is"})
    assert "occurs 2 times" in e1_span_in_composition(twice)


def _kb():
    triples = pd.DataFrame([
        ("a", "r", "b"), ("b", "s", "c"), ("b", "s", "c"),  # duplicate fact
        ("c", "r", "a"),  # a -r-> b? no: c -r-> a, then a-r->b : path c r a r b
        ("b", "r", "a"),  # b -s-> c, c -r-> a ; b -r-> a, a -r-> b gives e1 == e3 (dropped)
        ("d", "r", "b"), ("d", "r", "c"),  # (d, r) has two objects: dropped by unique_objects
    ], columns=["subject", "relation", "object"])
    entities = pd.DataFrame({"id": list("abcd"), "label": ["Ann", "Bob", "Cid", "Dee"],
                             "aliases": [["A"], [], ["C", "Cy"], []], "type": ["x", "y", "x", "y"]})
    relations = pd.DataFrame({"id": ["r", "s"], "template": ["the r of {}", "the s of {}"]})
    return triples, entities, relations


def test_builder_enumerates_bridge_first_paths():
    table = build_queries(*_kb())
    paths = set(zip(table.e1, table.r1, table.e2, table.r2, table.e3))
    assert paths == {("a", "r", "b", "s", "c"), ("c", "r", "a", "r", "b"), ("b", "s", "c", "r", "a")}
    row = table.set_index("id").loc["a|r|b|s|c"]
    assert row.source_prompt == "the s of the r of Ann is" and row.e3_aliases == ["C", "Cy"]


def test_builder_unique_objects_and_cap():
    loose = build_queries(*_kb(), BuilderConfig(unique_objects=False))
    assert {("d", "b"), ("d", "c")} <= set(zip(loose.e1, loose.e2))
    capped = build_queries(*_kb(), BuilderConfig(unique_objects=False, max_per_bridge=1))
    assert capped.groupby("e2").size().max() == 1


def test_toy_dataset_is_reproduced_by_the_builder():
    from latent_hops.toy.dataset import build_toy_dataset
    from latent_hops.toy.knowledge_graph import build_knowledge_graph, split_compositions

    kg = build_knowledge_graph()
    rebuilt = build_toy_dataset(kg, split_compositions(kg))
    pd.testing.assert_frame_equal(rebuilt, load_dataset("toy"))


def test_the_paper_csv_layout_round_trips(tmp_path):
    """The official code reads two_hop.csv with index_col=0: a leading index column, then id."""
    import pandas as pd

    from latent_hops.queries import write_paper_csv

    table = load_dataset("toy").iloc[:5]
    path = write_paper_csv(table, tmp_path / "two_hop.csv")
    header = path.read_text().splitlines()[0].split(",")
    assert header[0] == "" and header[1] == "id"
    as_the_paper_reads = pd.read_csv(path, index_col=0)
    assert list(as_the_paper_reads.index) == [0, 1, 2, 3, 4] and list(as_the_paper_reads.id) == list(table.id)
    assert as_the_paper_reads.e3_aliases.iloc[0] == repr(list(table.e3_aliases.iloc[0]))
    pd.testing.assert_frame_equal(load_dataset(path), table.reset_index(drop=True))
