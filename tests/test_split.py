from crce.lists import Certainty, ConceptLists, Item, Provenance, Split
from crce.split import make_split


def lists_for(concept_id: str) -> ConceptLists:
    levels = list(Certainty)
    return ConceptLists(
        concept=concept_id,
        id=concept_id,
        category="celebrity",
        corefs=[Item(text=f"{concept_id} c{i}", certainty=levels[i // 3]) for i in range(15)],
        retains=[Item(text=f"{concept_id} r{i}", certainty=levels[i // 3]) for i in range(15)],
        provenance=Provenance(source="llm"),
    )


def test_split_is_deterministic_and_per_concept():
    a = make_split(lists_for("taylor-swift"), seed=42)
    b = make_split(lists_for("taylor-swift"), seed=42)
    assert a == b
    assert make_split(lists_for("taylor-swift"), seed=7) != a
    assert len(a.coref_train) == 10 and len(a.coref_test) == 5
    assert len(a.retain_train) == 10 and len(a.retain_test) == 5
    texts = [i.text for i in a.coref_train + a.coref_test]
    assert sorted(texts) == sorted(i.text for i in lists_for("taylor-swift").corefs)


def test_split_carries_certainty_and_weight():
    split = make_split(lists_for("x"), seed=1)
    original = {i.text: i.certainty for i in lists_for("x").corefs}
    for item in split.coref_train + split.coref_test:
        assert item.certainty == original[item.text]
        assert (
            item.weight
            == {"Very High": 1.0, "High": 0.8, "Normal": 0.6, "Low": 0.4, "Very Low": 0.2}[
                item.certainty.value
            ]
        )


def test_split_roundtrips_through_its_schema(tmp_path):
    from crce.lists import read_split, write_model

    split = make_split(lists_for("x"), seed=3)
    write_model(split, tmp_path / "s.json")
    assert read_split(tmp_path / "s.json") == split
    assert isinstance(split, Split)


def test_schemas_in_workflow_are_current(tmp_path):
    from helpers import REPO

    from crce.lists import export_schemas

    for path in export_schemas(tmp_path):
        assert path.read_text() == (REPO / "workflow" / "schemas" / path.name).read_text(), (
            "regenerate with: python -c 'from crce.lists import export_schemas; export_schemas(\"workflow/schemas\")'"
        )
